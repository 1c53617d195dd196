"""The built-in corpus: a seeded, offline text-classification benchmark (DESIGN.md section 5).

Each text is a short news-like blurb whose label is the topic of its main clause, among 8 classes
by default (sports, politics, technology, health, business, arts, food, travel; `num_classes`
can add science and law, or use fewer). What makes it hard:

- Held-out class words: the test split draws its class words from lists that share no word
  and no stem with the train lists (train "football, goalkeepers, stadiums", test "soccer,
  referees, basketball"); see `class_vocabulary`. Only pretrained knowledge of language links
  them, so a model from random weights stays at chance.
- Held-out frames: with `held_out_templates` the test sentences are also built from main,
  negation, side-remark and filler wordings never used in training.
- Two classes in one text: side remarks ("Aside from a joke about pizza, ...", "Last week's
  issue was about elections.") and negations ("This is not about X but about Y", "It is Y, not
  X, that ...") name other classes; the main clause decides, wherever it sits in the text.
- A few percent of train labels are flipped to a random other class (test labels are clean),
  and lengths vary from 4 to about 50 words (at most about 60 tokens: nothing is cut at 64).

Knobs (`BuiltinCorpusConfig`; the defaults are the benchmark):

- num_train, num_test (3000, 600): examples per split; classes balanced exactly (train up to
  the flipped labels).
- label_noise (0.03): share of train labels replaced by a random other class.
- distractor_rate (0.4): chance of a side remark about another class; tried again, up to
  max_distractors (2) times, so about 16% of texts carry two.
- negation_rate (0.3): share of main clauses that name another class and rule it out.
- two_term_rate (0.3): chance that a mention (main or side) names two words of its class.
- max_fillers (2): class-free clauses per text, 0 to this many; they move the main clause and
  vary the length.
- num_classes (8): how many of CLASS_NAMES, in order (2 to 10).
- held_out_templates (True): test frames disjoint from train frames.
- held_out_words (True): test class words disjoint from train class words. False gives a task a
  model from random weights can learn (the from-scratch tier, simulations/zprobe_paper.toml).

Raising distractor_rate, negation_rate or max_fillers, adding classes or holding out frames
makes it harder; label_noise mostly slows training down.

Measured figures (seeds 0/1/2 of the corpus; pretrained all-MiniLM-L6-v2 with LoRA r=8,
alpha=16 on query/value and a trainable classifier head; AdamW lr 1e-3, batch 16, max_length
64, one CPU thread, about 130 s for 300 steps):

- centralized, 300 steps: test accuracy 88.2 / 93.8 / 91.3% (at 100 steps: 83.7 / 87.3 / 86.5%);
- same architecture from random weights, same recipe: 12.5% (chance; its loss stays at ln 8);
- a FedIT-style simulation of the default federation (10 clients, Dirichlet(0.5) label skew,
  4 clients a round, 20 local steps, lr 1e-3, 6 rounds): 79.7% (seed 0), 62.7% (seed 1, 70.7%
  a round earlier); FedIT under label skew swings from round to round.
- Harder setting (distractor_rate 0.5, negation_rate 0.35, max_fillers 3): centralized 89.0 /
  87.8%, the federation 72.2 / 57.7% after 6 rounds, 82.7% after 10 (seed 0).
- For comparison, before frames were held out the same recipe reached 97-98%; the remaining
  errors are split between unseen frames and test words far from their class's train words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from fedlora.config import ConfigError

Split = Literal["train", "test"]

CLASS_NAMES: tuple[str, ...] = (
    "sports",
    "politics",
    "technology",
    "health",
    "business",
    "arts",
    "food",
    "travel",
    "science",
    "law",
)

# Class words. Every term is a plural or mass noun, so a template can put any of them after
# a preposition ("about X", "of X") and stay grammatical. The train and test lists of a class
# are related words (synonyms, neighbours in the same field) and share no word and no stem:
# a model can only carry what it learned on the left column over to the right one through
# what it already knows about language.
_TRAIN_TERMS: dict[str, tuple[str, ...]] = {
    "sports": (
        "football",
        "goalkeepers",
        "stadiums",
        "strikers",
        "cricket",
        "rugby",
        "hockey",
        "athletes",
        "championships",
        "tournaments",
        "playoffs",
        "quarterbacks",
        "wickets",
        "sprinters",
        "marathons",
        "baseball",
        "volleyball",
        "midfielders",
        "touchdowns",
        "boxing",
        "cyclists",
        "gymnastics",
    ),
    "politics": (
        "elections",
        "senators",
        "parliament",
        "ballots",
        "campaigns",
        "legislation",
        "lawmakers",
        "diplomats",
        "presidents",
        "manifestos",
        "referendums",
        "congress",
        "candidates",
        "coalitions",
        "treaties",
        "ministers",
        "voters",
        "politicians",
        "embassies",
        "impeachment",
        "constitutions",
        "polling",
    ),
    "technology": (
        "software",
        "computers",
        "smartphones",
        "algorithms",
        "databases",
        "processors",
        "robots",
        "internet",
        "laptops",
        "programmers",
        "semiconductors",
        "encryption",
        "browsers",
        "servers",
        "cybersecurity",
        "apps",
        "gadgets",
        "keyboards",
        "hackers",
        "coding",
        "firmware",
        "microchips",
    ),
    "health": (
        "doctors",
        "hospitals",
        "vaccines",
        "patients",
        "nurses",
        "surgery",
        "diseases",
        "medicine",
        "clinics",
        "diabetes",
        "infections",
        "therapy",
        "prescriptions",
        "antibiotics",
        "symptoms",
        "cancer",
        "pharmacies",
        "diagnosis",
        "paramedics",
        "epidemics",
        "allergies",
        "vaccinations",
    ),
    "business": (
        "stocks",
        "investors",
        "banks",
        "profits",
        "shareholders",
        "dividends",
        "mergers",
        "economy",
        "inflation",
        "markets",
        "revenue",
        "loans",
        "earnings",
        "bankruptcy",
        "accountants",
        "budgets",
        "entrepreneurs",
        "exports",
        "retailers",
        "startups",
        "corporations",
        "interest rates",
    ),
    "arts": (
        "movies",
        "actors",
        "concerts",
        "guitars",
        "albums",
        "orchestras",
        "paintings",
        "museums",
        "novels",
        "poetry",
        "theater",
        "musicians",
        "singers",
        "ballet",
        "sculptures",
        "operas",
        "symphonies",
        "drummers",
        "galleries",
        "films",
        "choirs",
        "screenplays",
    ),
    "food": (
        "recipes",
        "restaurants",
        "chefs",
        "pasta",
        "desserts",
        "bakeries",
        "vegetables",
        "cheese",
        "soups",
        "kitchens",
        "cooking",
        "sandwiches",
        "pizza",
        "spices",
        "chocolate",
        "breakfast",
        "sushi",
        "noodles",
        "salads",
        "grilling",
        "bread",
        "cakes",
    ),
    "travel": (
        "tourists",
        "hotels",
        "flights",
        "airports",
        "passports",
        "vacations",
        "luggage",
        "cruises",
        "beaches",
        "sightseeing",
        "itineraries",
        "backpacking",
        "resorts",
        "visas",
        "airlines",
        "hostels",
        "destinations",
        "suitcases",
        "souvenirs",
        "guidebooks",
        "holidays",
        "cruise ships",
    ),
    "science": (
        "physics",
        "astronomy",
        "chemists",
        "laboratories",
        "telescopes",
        "molecules",
        "fossils",
        "biologists",
        "galaxies",
        "experiments",
        "electrons",
        "asteroids",
        "researchers",
        "hypotheses",
        "evolution",
        "particles",
        "volcanoes",
        "microbes",
        "mathematicians",
        "quantum mechanics",
        "black holes",
        "genomes",
    ),
    "law": (
        "courts",
        "judges",
        "lawyers",
        "prisons",
        "verdicts",
        "police",
        "detectives",
        "lawsuits",
        "burglaries",
        "juries",
        "murders",
        "arrests",
        "testimony",
        "inmates",
        "forensics",
        "parole",
        "indictments",
        "convictions",
        "criminals",
        "fraud",
        "legal disputes",
        "smuggling",
    ),
}

_TEST_TERMS: dict[str, tuple[str, ...]] = {
    "sports": (
        "soccer",
        "referees",
        "basketball",
        "tennis",
        "golf",
        "olympics",
        "umpires",
        "swimmers",
        "jockeys",
        "wrestling",
        "skiers",
        "halftime",
        "scoreboards",
        "javelin",
        "decathlons",
        "lacrosse",
        "badminton",
        "surfing",
        "linebackers",
        "teammates",
    ),
    "politics": (
        "government",
        "democracy",
        "mayors",
        "chancellors",
        "democrats",
        "republicans",
        "lobbyists",
        "vetoes",
        "cabinets",
        "bureaucrats",
        "ambassadors",
        "statesmen",
        "inaugurations",
        "filibusters",
        "dictators",
        "monarchy",
        "regimes",
        "partisanship",
        "sanctions",
        "councils",
    ),
    "technology": (
        "hardware",
        "developers",
        "websites",
        "transistors",
        "downloads",
        "gigabytes",
        "routers",
        "touchscreens",
        "chatbots",
        "silicon",
        "electronics",
        "bandwidth",
        "bluetooth",
        "printers",
        "drones",
        "modems",
        "pixels",
        "motherboards",
        "spreadsheets",
        "operating systems",
    ),
    "health": (
        "physicians",
        "illness",
        "pills",
        "healthcare",
        "flu",
        "viruses",
        "asthma",
        "tumors",
        "dentists",
        "pediatricians",
        "immunization",
        "pandemics",
        "cholesterol",
        "ambulances",
        "fever",
        "psychiatrists",
        "insulin",
        "midwives",
        "obesity",
        "blood pressure",
    ),
    "business": (
        "finance",
        "commerce",
        "companies",
        "traders",
        "currency",
        "mortgages",
        "salaries",
        "auditors",
        "recession",
        "acquisitions",
        "wages",
        "portfolios",
        "creditors",
        "lenders",
        "tariffs",
        "unemployment",
        "payroll",
        "assets",
        "executives",
        "valuations",
    ),
    "arts": (
        "cinema",
        "pianists",
        "violins",
        "jazz",
        "dancers",
        "artists",
        "playwrights",
        "songs",
        "rappers",
        "hollywood",
        "documentaries",
        "composers",
        "exhibitions",
        "sitcoms",
        "vocalists",
        "saxophones",
        "murals",
        "portraits",
        "melodies",
        "animation",
    ),
    "food": (
        "cuisine",
        "meals",
        "ingredients",
        "burgers",
        "waiters",
        "pastries",
        "fruits",
        "steak",
        "rice",
        "snacks",
        "lunch",
        "tacos",
        "curry",
        "cafes",
        "seafood",
        "dumplings",
        "barbecue",
        "omelettes",
        "groceries",
        "pancakes",
    ),
    "travel": (
        "journeys",
        "trips",
        "motels",
        "voyages",
        "excursions",
        "campsites",
        "landmarks",
        "ferries",
        "layovers",
        "passengers",
        "inns",
        "safaris",
        "honeymoons",
        "lodges",
        "baggage",
        "airfare",
        "getaways",
        "expeditions",
        "jet lag",
        "boarding passes",
    ),
    "science": (
        "planets",
        "atoms",
        "geology",
        "scientists",
        "photons",
        "dinosaurs",
        "comets",
        "neutrons",
        "ecosystems",
        "genetics",
        "orbits",
        "zoology",
        "meteorites",
        "eclipses",
        "stars",
        "cells",
        "theories",
        "supernovas",
        "isotopes",
        "gravity",
    ),
    "law": (
        "attorneys",
        "trials",
        "crimes",
        "sheriffs",
        "robberies",
        "handcuffs",
        "prosecutors",
        "misdemeanors",
        "witnesses",
        "jails",
        "sentences",
        "thieves",
        "homicides",
        "manslaughter",
        "cops",
        "offenders",
        "bail",
        "subpoenas",
        "defendants",
        "kidnappings",
    ),
}

# Sentence frames, with separate wordings for the train and the test split (used when
# `held_out_templates` is on): a model that only memorised where the deciding word sits in the
# training frames meets frames it has never seen, and has to understand "rather than", "aside
# from" and the like.
_Templates = dict[str, tuple[str, ...]]

# Main clauses: {m} is what the text is about and decides the label.
_MAIN: _Templates = {
    "train": (
        "This article is about {m}.",
        "The story covers {m}.",
        "Today's report focuses on {m}.",
        "The main subject here is {m}.",
        "Everyone in the newsroom is talking about {m}.",
        "A long feature on {m} opens the section.",
        "The headline is all about {m}.",
        "She wrote a column on {m}.",
        "We spent the whole episode discussing {m}.",
        "The topic of this piece is {m}.",
        "Most of the text deals with {m}.",
        "It is a detailed look at {m}.",
        "The newsletter this week is dedicated to {m}.",
        "Listeners called in with questions about {m}.",
        "The interview centres on {m}.",
        "Here is the latest on {m}.",
        "The essay argues something new about {m}.",
        "Our correspondent sent a dispatch about {m}.",
        "The thread is full of opinions on {m}.",
        "The in-depth piece follows the world of {m}.",
    ),
    "test": (
        "The piece you are about to read concerns {m}.",
        "This week's lead story is on {m}.",
        "Our reporter spent a month looking into {m}.",
        "The subject of the broadcast was {m}.",
        "The whole conversation revolved around {m}.",
        "A new series about {m} starts today.",
        "Tonight's segment is about {m}.",
        "It offers an overview of {m}.",
        "The authors write mainly about {m}.",
        "This bulletin reports on {m}.",
        "The special edition is about {m}.",
        "Our focus today is {m}.",
    ),
}

# Main clauses that name another class only to rule it out: {x} is negated, {m} decides.
_NEGATION: _Templates = {
    "train": (
        "This is not about {x} but about {m}.",
        "Despite the title, the piece has nothing to do with {x}; it is about {m}.",
        "Forget {x}: the real story is {m}.",
        "It is {m}, not {x}, that the report covers.",
        "Rather than {x}, the column discusses {m}.",
        "No, this one is not on {x} at all; it is on {m}.",
        "The topic is {m} and definitely not {x}.",
        "Readers expecting a story on {x} will instead find one about {m}.",
        "The report was meant to cover {x}, but it ended up being about {m}.",
        "Instead of {x}, the episode talks about {m}.",
        "Not {x} this time: the feature is about {m}.",
        "The article never mentions {x}; its subject is {m}.",
        "Anyone looking for {x} is in the wrong place, since this covers {m}.",
        "The editor dropped the part on {x} and kept the part on {m}.",
        "The question is about {m}, not about {x}.",
        "People assume it concerns {x}, yet it concerns {m}.",
    ),
    "test": (
        "Nothing here concerns {x}; everything concerns {m}.",
        "Those hoping to read about {x} will be disappointed, because the piece is about {m}.",
        "It looks like a piece on {x}, but it is really about {m}.",
        "The focus is {m}, with no attention paid to {x}.",
        "Put {x} aside: this is a story about {m}.",
        "The writer skips {x} entirely and concentrates on {m}.",
        "It deals with {m} rather than with {x}.",
        "This has little to do with {x} and much to do with {m}.",
        "Some thought the piece would be on {x}; in fact it covers {m}.",
        "It is about {m}. It is not about {x}.",
    ),
}

# Side remarks about another class: {d} appears but does not decide the label.
_DISTRACTOR_PREFIX: _Templates = {
    "train": (
        "Although there is a brief mention of {d}, ",
        "Even with a passing nod to {d}, ",
        "Apart from one line on {d}, ",
        "Aside from a joke about {d}, ",
        "After a short detour through {d}, ",
        "While an old photo of {d} hangs on the wall, ",
    ),
    "test": (
        "Save for a short remark on {d}, ",
        "Besides a quick mention of {d}, ",
        "Following a brief aside about {d}, ",
        "Once a quick word on {d} is out of the way, ",
    ),
}
_DISTRACTOR_SUFFIX: _Templates = {
    "train": (
        ", even though {d} get a brief mention.",
        ", with only a passing reference to {d}.",
        ", although the author usually writes about {d}.",
        ", not counting a footnote on {d}.",
        ", while a sidebar about {d} runs next to it.",
        ", and an advert for {d} interrupts it once.",
    ),
    "test": (
        ", though there is one remark about {d}.",
        ", with a single line on {d} near the end.",
        ", and the cover photo happens to show {d}.",
        ", although the same writer is known for pieces on {d}.",
    ),
}
_DISTRACTOR_SENTENCE: _Templates = {
    "train": (
        "Last week's issue was about {d}.",
        "Next week the same team will turn to {d}.",
        "A short note about {d} appears at the bottom.",
        "An advert for {d} runs alongside it.",
        "The author normally covers {d}.",
        "A reader's letter about {d} is printed on another page.",
        "The previous episode dealt with {d}.",
        "A link to an older piece on {d} sits in the margin.",
    ),
    "test": (
        "The next issue will be about {d}.",
        "An older article on {d} is linked below.",
        "A promotion for {d} appears in the margin.",
        "The writer's previous work was on {d}.",
        "A caption mentions {d} in passing.",
    ),
}

# Clauses that carry no class at all: they vary length and position.
_FILLER_SENTENCE: _Templates = {
    "train": (
        "It was published on Monday.",
        "The editor approved it quickly.",
        "Several readers wrote back.",
        "It runs to about two pages.",
        "It appeared in the weekend edition.",
        "Nobody expected it to be so long.",
        "The first draft was written in a single night.",
        "It has already been shared many times.",
        "A translation will follow soon.",
        "The comments section is busy.",
        "It took three weeks to prepare.",
        "The writer thanks everyone who helped.",
        "Some details are still being checked.",
        "It is the third part of a series.",
    ),
    "test": (
        "It came out on Friday.",
        "Readers liked it.",
        "It is fairly short.",
        "A second part is planned.",
        "It was edited twice.",
        "It includes two charts.",
        "It went out by email.",
        "The layout was redesigned for it.",
    ),
}
_FILLER_PREFIX: _Templates = {
    "train": (
        "On Tuesday, ",
        "According to the editors, ",
        "As usual, ",
        "In the morning edition, ",
        "To nobody's surprise, ",
        "Put simply, ",
    ),
    "test": (
        "On Friday, ",
        "In the latest issue, ",
        "Once more, ",
        "As expected, ",
    ),
}


@dataclass(frozen=True)
class BuiltinCorpusConfig:
    """Knobs of the generated corpus; the defaults are the benchmark (see the module docstring)."""

    num_train: int = 3000  # train examples, classes balanced
    num_test: int = 600  # test examples, classes balanced, labels always clean
    label_noise: float = 0.03  # share of train labels replaced by a random other class
    distractor_rate: float = 0.4  # chance of a side remark on another class (tried max_distractors times)
    negation_rate: float = 0.3  # share of main clauses that name another class and rule it out
    two_term_rate: float = 0.3  # chance that a mention names two words of its class, not one
    max_distractors: int = 2  # most side remarks one text can carry
    max_fillers: int = 2  # most class-free clauses one text can carry (0 to this many, uniform)
    num_classes: int = 8  # how many of CLASS_NAMES to use, in order
    held_out_templates: bool = True  # test sentences use frames never seen in training
    held_out_words: bool = True  # test class words never seen in training

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError("builtin corpus: num_train and num_test must be at least 1")
        for name in ("label_noise", "distractor_rate", "negation_rate", "two_term_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"builtin corpus: {name} must lie in [0, 1], got {value}")
        if self.max_fillers < 0 or self.max_distractors < 0:
            raise ConfigError("builtin corpus: max_fillers and max_distractors must be >= 0")
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ConfigError(f"builtin corpus: num_classes must lie in [2, {len(CLASS_NAMES)}]")


@dataclass(frozen=True)
class TextExamples:
    """Texts and their integer labels, index-aligned."""

    texts: list[str]
    labels: list[int]


@dataclass(frozen=True)
class BuiltinCorpus:
    """The generated corpus: class names (index = label), a train and a test split."""

    class_names: list[str]
    train: TextExamples
    test: TextExamples


def class_vocabulary(split: Split) -> dict[str, tuple[str, ...]]:
    """The class words the given split draws from, by class name (train and test are disjoint)."""
    if split == "train":
        return dict(_TRAIN_TERMS)
    if split == "test":
        return dict(_TEST_TERMS)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def generate_corpus(seed: int, config: BuiltinCorpusConfig = BuiltinCorpusConfig()) -> BuiltinCorpus:
    """Generate the corpus for `seed`: same seed and config, same corpus."""
    class_names = list(CLASS_NAMES[: config.num_classes])
    frames = "test" if config.held_out_templates else "train"
    words = "test" if config.held_out_words else "train"
    train = _generate_split(_rng(seed, "train"), "train", "train", class_names, config.num_train, config)
    test = _generate_split(_rng(seed, "test"), words, frames, class_names, config.num_test, config)
    # A stream of its own, so the noise rate changes labels only, never texts.
    noisy = _add_label_noise(_rng(seed, "noise"), train.labels, len(class_names), config.label_noise)
    return BuiltinCorpus(class_names, TextExamples(train.texts, noisy), test)


def public_split(seed: int, count: int, num_classes: int = 8) -> TextExamples:
    """A labelled split that stands for public data (the pretraining of fedlora/pretrain.py): the
    train class words and frames, CLASS_NAMES[:num_classes], clean labels, no negations or side
    remarks. Its own random stream: its texts are drawn independently of every train and test split."""
    plain = BuiltinCorpusConfig(num_train=count, label_noise=0.0, distractor_rate=0.0, negation_rate=0.0)
    return _generate_split(_rng(seed, "public"), "train", "train", list(CLASS_NAMES[:num_classes]), count, plain)


def _rng(seed: int, stream: str) -> random.Random:
    # String seeds hash with SHA-512 inside `random`: stable across processes and platforms.
    return random.Random(f"fedlora-builtin/{seed}/{stream}")


def _generate_split(
    rng: random.Random,
    words: Split,
    frames: Split,
    class_names: list[str],
    count: int,
    config: BuiltinCorpusConfig,
) -> TextExamples:
    terms = class_vocabulary(words)
    # Exactly balanced classes (up to the remainder), in random order.
    labels = [i % len(class_names) for i in range(count)]
    rng.shuffle(labels)
    texts = [_text(rng, terms, frames, class_names, label, config) for label in labels]
    return TextExamples(texts, labels)


def _text(
    rng: random.Random,
    terms: dict[str, tuple[str, ...]],
    frames: Split,
    class_names: list[str],
    label: int,
    config: BuiltinCorpusConfig,
) -> str:
    others = [name for i, name in enumerate(class_names) if i != label]
    main = _mention(rng, terms[class_names[label]], config.two_term_rate)
    if rng.random() < config.negation_rate:
        negated = rng.choice(terms[rng.choice(others)])
        core = rng.choice(_NEGATION[frames]).format(m=main, x=negated)
    else:
        core = rng.choice(_MAIN[frames]).format(m=main)

    before: list[str] = []
    after: list[str] = []
    slots = ["prefix", "suffix", "sentence"]
    for _ in range(config.max_distractors):
        if rng.random() >= config.distractor_rate:
            break
        distractor = _mention(rng, terms[rng.choice(others)], config.two_term_rate)
        where = rng.choice(slots)
        if where == "prefix":
            core = rng.choice(_DISTRACTOR_PREFIX[frames]).format(d=distractor) + _lower_first(core)
        elif where == "suffix":
            core = core[:-1] + rng.choice(_DISTRACTOR_SUFFIX[frames]).format(d=distractor)
        else:
            side = rng.choice(_DISTRACTOR_SENTENCE[frames]).format(d=distractor)
            (before if rng.random() < 0.5 else after).append(side)
        if where != "sentence":
            slots.remove(where)  # a clause wraps the main clause once from each side at most

    prefixed = False
    for _ in range(rng.randint(0, config.max_fillers)):
        roll = rng.random()
        if roll < 0.2 and not prefixed:
            core = rng.choice(_FILLER_PREFIX[frames]) + _lower_first(core)
            prefixed = True
        elif roll < 0.6:
            before.insert(rng.randint(0, len(before)), rng.choice(_FILLER_SENTENCE[frames]))
        else:
            after.insert(rng.randint(0, len(after)), rng.choice(_FILLER_SENTENCE[frames]))
    return " ".join(before + [_upper_first(core)] + after)


def _mention(rng: random.Random, terms: tuple[str, ...], two_term_rate: float) -> str:
    if rng.random() < two_term_rate:
        first, second = rng.sample(terms, 2)
        return f"{first} and {second}"
    return rng.choice(terms)


def _add_label_noise(rng: random.Random, labels: list[int], num_classes: int, rate: float) -> list[int]:
    noisy = []
    for label in labels:
        if rng.random() < rate:
            label = rng.choice([c for c in range(num_classes) if c != label])
        noisy.append(label)
    return noisy


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[0].upper() + text[1:]
