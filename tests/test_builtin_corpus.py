"""The built-in corpus: seeded, balanced, disjoint class words, noise in train only, varied texts."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest

from fedlora.config import ConfigError
from fedlora.data.builtin import (
    CLASS_NAMES,
    BuiltinCorpusConfig,
    class_vocabulary,
    generate_corpus,
)

SMALL = BuiltinCorpusConfig(num_train=800, num_test=240)


def _words(vocabulary: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    return {name: {word for term in terms for word in term.split()} for name, terms in vocabulary.items()}


def _mentions(text: str, terms: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(term)}\b", text.lower()) for term in terms)


def test_same_seed_gives_the_same_corpus() -> None:
    assert generate_corpus(7, SMALL) == generate_corpus(7, SMALL)


def test_different_seeds_give_different_corpora() -> None:
    first, second = generate_corpus(1, SMALL), generate_corpus(2, SMALL)
    assert first.train.texts != second.train.texts
    assert first.test.texts != second.test.texts


def test_sizes_and_classes() -> None:
    corpus = generate_corpus(0, SMALL)
    assert len(corpus.class_names) >= 4
    assert corpus.class_names == list(CLASS_NAMES[: SMALL.num_classes])
    assert len(corpus.train.texts) == len(corpus.train.labels) == SMALL.num_train
    assert len(corpus.test.texts) == len(corpus.test.labels) == SMALL.num_test
    assert set(corpus.train.labels) | set(corpus.test.labels) <= set(range(len(corpus.class_names)))


def test_classes_are_balanced() -> None:
    corpus = generate_corpus(3, SMALL)
    num_classes = len(corpus.class_names)
    # Test labels are exactly balanced; train ones up to the few flipped by label noise.
    assert set(Counter(corpus.test.labels).values()) == {SMALL.num_test // num_classes}
    expected = SMALL.num_train / num_classes
    for count in Counter(corpus.train.labels).values():
        assert abs(count - expected) <= 0.25 * expected


def test_class_words_of_train_and_test_are_disjoint() -> None:
    train, test = _words(class_vocabulary("train")), _words(class_vocabulary("test"))
    assert set(train) == set(test) == set(CLASS_NAMES)
    train_all = set().union(*train.values())
    test_all = set().union(*test.values())
    assert not train_all & test_all
    # Not even a shared stem inside a class ("goalkeepers" / "goalposts" would leak).
    for name in CLASS_NAMES:
        for a in train[name]:
            for b in test[name]:
                assert a[:5] != b[:5], (name, a, b)


def test_each_split_uses_only_its_own_class_words() -> None:
    corpus = generate_corpus(4, SMALL)
    train_words = set().union(*_words(class_vocabulary("train")).values())
    test_words = set().union(*_words(class_vocabulary("test")).values())
    train_tokens = {w for text in corpus.train.texts for w in re.findall(r"[a-z']+", text.lower())}
    test_tokens = {w for text in corpus.test.texts for w in re.findall(r"[a-z']+", text.lower())}
    assert not train_tokens & test_words
    assert not test_tokens & train_words


def test_the_label_class_is_always_mentioned_in_test_texts() -> None:
    corpus = generate_corpus(5, SMALL)
    vocabulary = class_vocabulary("test")
    for text, label in zip(corpus.test.texts, corpus.test.labels):
        assert _mentions(text, vocabulary[corpus.class_names[label]]), text


def test_label_noise_only_in_train_at_about_the_configured_rate() -> None:
    config = replace(SMALL, num_train=4000, label_noise=0.1)
    noisy = generate_corpus(6, config)
    clean = generate_corpus(6, replace(config, label_noise=0.0))
    # Noise has a random stream of its own: texts stay the same, only labels move.
    assert noisy.train.texts == clean.train.texts
    assert noisy.test == clean.test
    flipped = sum(a != b for a, b in zip(noisy.train.labels, clean.train.labels)) / config.num_train
    assert 0.08 <= flipped <= 0.12


def test_hard_constructions_and_varied_lengths() -> None:
    corpus = generate_corpus(8, SMALL)
    lengths = [len(text.split()) for text in corpus.train.texts]
    assert min(lengths) <= 8 and max(lengths) >= 40
    assert len(set(lengths)) >= 25
    # Most texts are unique, and a good share names words of two or more classes.
    assert len(set(corpus.train.texts)) >= 0.95 * len(corpus.train.texts)
    vocabulary = class_vocabulary("train")
    multi = sum(sum(_mentions(text, terms) for terms in vocabulary.values()) >= 2 for text in corpus.train.texts)
    assert multi >= 0.4 * len(corpus.train.texts)


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(ConfigError):
        BuiltinCorpusConfig(label_noise=1.5)
    with pytest.raises(ConfigError):
        BuiltinCorpusConfig(num_classes=1)
