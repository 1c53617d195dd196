"""The from-scratch tier's base: a tiny BERT pretrained on a public split, cached, and the corpus knobs it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fedlora import pretrain
from fedlora.config import ConfigError, config_from_dict
from fedlora.data.builtin import BuiltinCorpusConfig, class_vocabulary, generate_corpus, public_split
from fedlora.model import build_base_model
from fedlora.pretrain import CACHE_VARIABLE
from tests.conftest import tiny_config

SMALL = ("model.tiny.pretrain_steps=4", "model.tiny.pretrain_examples=64", "model.tiny.hidden_size=16")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_VARIABLE, str(folder))
    return folder


def test_the_pretrained_encoder_is_trained_once_per_seed_and_reused_from_the_cache(cache: Path) -> None:
    config = tiny_config(*SMALL)
    first = build_base_model(config.model, 8, seed=3)
    (stored,) = cache.glob("tiny-base-*.pt")
    written = stored.stat().st_mtime_ns
    again = build_base_model(config.model, 8, seed=3)
    assert stored.stat().st_mtime_ns == written  # read back, not trained again
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    other_seed = build_base_model(config.model, 8, seed=4)
    assert len(list(cache.glob("tiny-base-*.pt"))) == 2
    assert not torch.equal(first.bert.embeddings.word_embeddings.weight, other_seed.bert.embeddings.word_embeddings.weight)


def test_pretraining_changes_the_encoder_and_leaves_the_head_as_the_seed_made_it(cache: Path) -> None:
    random_base = build_base_model(tiny_config("model.tiny.hidden_size=16").model, 8, seed=3)
    pretrained = build_base_model(tiny_config(*SMALL).model, 8, seed=3)
    assert torch.equal(random_base.classifier.weight, pretrained.classifier.weight)
    changed = [
        name
        for name, tensor in pretrained.bert.state_dict().items()
        if not torch.equal(tensor, random_base.bert.state_dict()[name])
    ]
    assert "encoder.layer.0.attention.self.query.weight" in changed and "pooler.dense.weight" in changed


def test_a_longer_pretraining_teaches_the_base_the_public_topics(cache: Path) -> None:
    config = tiny_config("model.tiny.pretrain_steps=120", "model.tiny.pretrain_examples=1000", "model.tiny.hidden_size=32")
    base = build_base_model(config.model, 8, seed=0)
    # A linear probe on the [CLS] features of held-out public texts: far above chance (1/8).
    from fedlora.model import load_tokenizer

    texts = public_split(seed=99, count=400)
    encoded = load_tokenizer(config.model)(texts.texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = base.eval().bert(**encoded).pooler_output
    labels = torch.tensor(texts.labels)
    probe = torch.nn.Linear(features.shape[1], 8)
    optimizer = torch.optim.Adam(probe.parameters(), lr=5e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(probe(features[:300]), labels[:300])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (probe(features[300:]).argmax(-1) == labels[300:]).float().mean().item()
    assert accuracy > 0.6, accuracy


def test_the_public_split_is_drawn_apart_from_the_corpus_and_is_clean() -> None:
    corpus = generate_corpus(0, BuiltinCorpusConfig(num_train=500, num_test=100))
    public = public_split(0, 500)
    assert public.texts != corpus.train.texts[:500]
    assert public_split(0, 500) == public  # seeded
    assert sorted(set(public.labels)) == list(range(8))
    assert not any(" not " in text or "Aside from" in text for text in public.texts)


@pytest.mark.parametrize("held_out", [True, False])
def test_held_out_words_decides_whether_test_texts_use_the_train_topic_words(held_out: bool) -> None:
    corpus = generate_corpus(0, BuiltinCorpusConfig(num_train=50, num_test=200, held_out_words=held_out))
    train_words = {word for words in class_vocabulary("train").values() for word in words}
    uses_train_words = sum(any(re.search(rf"\b{re.escape(w)}\b", text) for w in train_words) for text in corpus.test.texts)
    assert (uses_train_words == 0) if held_out else (uses_train_words == len(corpus.test.texts))


def test_corpus_knobs_reach_the_generated_data() -> None:
    plain = config_from_dict({"data": {"corpus": {"negation_rate": 0.0, "distractor_rate": 0.0, "held_out_words": False}}})
    from fedlora.data.sources import load_data

    data = load_data(plain.data, seed=0)
    assert not any(" not " in text for text in data.train.texts)


def test_corpus_knobs_with_another_source_are_refused_by_name(tmp_path: Path) -> None:
    table = tmp_path / "d.csv"
    table.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(ConfigError, match=r"\[data.corpus\].*data.source"):
        config_from_dict({"data": {"source": str(table), "corpus": {"negation_rate": 0.0}}})


def test_a_base_pretrained_on_fewer_topics_is_another_base_and_its_public_split_holds_only_those(cache: Path) -> None:
    assert sorted(set(public_split(0, 200, num_classes=4).labels)) == [0, 1, 2, 3]
    all_topics = build_base_model(tiny_config(*SMALL).model, 8, seed=3)
    four_topics = build_base_model(tiny_config(*SMALL, "model.tiny.pretrain_topics=4").model, 8, seed=3)
    assert len(list(cache.glob("tiny-base-*.pt"))) == 2
    assert not torch.equal(all_topics.bert.pooler.dense.weight, four_topics.bert.pooler.dense.weight)


def test_a_section_of_another_source_read_back_from_its_dump_is_accepted(tmp_path: Path) -> None:
    table = tmp_path / "d.csv"
    table.write_text("text,label\na,x\nb,y\n")
    data = config_from_dict({"data": {"source": str(table)}}).data
    assert type(data).model_validate_json(data.model_dump_json()) == data  # as workspace caches re-read it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.name='minilm'", "model.tiny.pretrain_steps=5"), "only the 'tiny' classifier is pretrained"),
        (("model.pretrained=false", "model.tiny.pretrain_steps=5"), "choose one"),
        (("output.wandb_mode='online'",), "output.wandb_mode: its tracker is not in output.trackers"),
        (("output.mlflow_uri='http://tracking:5000'",), "output.mlflow_uri: its tracker is not in output.trackers"),
    ],
)
def test_settings_that_would_have_no_effect_are_refused_by_key(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)
    read_back = tiny_config("model.tiny.pretrain_steps=5", "output.trackers=['mlflow']")
    assert type(read_back).model_validate_json(read_back.model_dump_json()) == read_back


def test_a_damaged_cache_file_is_trained_again_and_a_filled_cache_is_read_without_its_lock(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(*SMALL)
    first = build_base_model(config.model, 8, seed=3)
    (stored,) = cache.glob("tiny-base-*.pt")
    stored.write_bytes(stored.read_bytes()[:100])  # truncated, as after a crash without fsync
    again = build_base_model(config.model, 8, seed=3)
    assert torch.equal(first.bert.pooler.dense.weight, again.bert.pooler.dense.weight)
    assert not list(cache.glob("*.partial"))

    def no_lock(path: Path):  # a shared, read-only cache: taking the lock would fail there
        raise PermissionError(path)

    monkeypatch.setattr(pretrain, "_locked", no_lock)
    read = build_base_model(config.model, 8, seed=3)
    assert torch.equal(first.bert.pooler.dense.weight, read.bert.pooler.dense.weight)
