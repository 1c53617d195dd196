"""The built-in corpus: a seeded, offline text-classification benchmark (DESIGN.md section 5).

PLACEHOLDER: figures and knobs are filled in after measurement.
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
        "football", "goalkeepers", "stadiums", "strikers", "cricket", "rugby", "hockey",
        "athletes", "championships", "tournaments", "playoffs", "quarterbacks", "wickets",
        "sprinters", "marathons", "baseball", "volleyball", "midfielders", "touchdowns",
        "boxing", "cyclists", "gymnastics",
    ),
    "politics": (
        "elections", "senators", "parliament", "ballots", "campaigns", "legislation",
        "lawmakers", "diplomats", "presidents", "manifestos", "referendums", "congress",
        "candidates", "coalitions", "treaties", "ministers", "voters", "politicians",
        "embassies", "impeachment", "constitutions", "polling",
    ),
    "technology": (
        "software", "computers", "smartphones", "algorithms", "databases", "processors",
        "robots", "internet", "laptops", "programmers", "semiconductors", "encryption",
        "browsers", "servers", "cybersecurity", "apps", "gadgets", "keyboards", "hackers",
        "coding", "firmware", "microchips",
    ),
    "health": (
        "doctors", "hospitals", "vaccines", "patients", "nurses", "surgery", "diseases",
        "medicine", "clinics", "diabetes", "infections", "therapy", "prescriptions",
        "antibiotics", "symptoms", "cancer", "pharmacies", "diagnosis", "paramedics",
        "epidemics", "allergies", "vaccinations",
    ),
    "business": (
        "stocks", "investors", "banks", "profits", "shareholders", "dividends", "mergers",
        "economy", "inflation", "markets", "revenue", "loans", "earnings", "bankruptcy",
        "accountants", "budgets", "entrepreneurs", "exports", "retailers", "startups",
        "corporations", "interest rates",
    ),
    "arts": (
        "movies", "actors", "concerts", "guitars", "albums", "orchestras", "paintings",
        "museums", "novels", "poetry", "theater", "musicians", "singers", "ballet",
        "sculptures", "operas", "symphonies", "drummers", "galleries", "films", "choirs",
        "screenplays",
    ),
    "food": (
        "recipes", "restaurants", "chefs", "pasta", "desserts", "bakeries", "vegetables",
        "cheese", "soups", "kitchens", "cooking", "sandwiches", "pizza", "spices",
        "chocolate", "breakfast", "sushi", "noodles", "salads", "grilling", "bread", "cakes",
    ),
    "travel": (
        "tourists", "hotels", "flights", "airports", "passports", "vacations", "luggage",
        "cruises", "beaches", "sightseeing", "itineraries", "backpacking", "resorts", "visas",
        "airlines", "hostels", "destinations", "suitcases", "souvenirs", "guidebooks",
        "holidays", "cruise ships",
    ),
    "science": (
        "physics", "astronomy", "chemists", "laboratories", "telescopes", "molecules",
        "fossils", "biologists", "galaxies", "experiments", "electrons", "asteroids",
        "researchers", "hypotheses", "evolution", "particles", "volcanoes", "microbes",
        "mathematicians", "quantum mechanics", "black holes", "genomes",
    ),
    "law": (
        "courts", "judges", "lawyers", "prisons", "verdicts", "police", "detectives",
        "lawsuits", "burglaries", "juries", "murders", "arrests", "testimony", "inmates",
        "forensics", "parole", "indictments", "convictions", "criminals", "fraud",
        "legal disputes", "smuggling",
    ),
}

_TEST_TERMS: dict[str, tuple[str, ...]] = {
    "sports": (
        "soccer", "referees", "basketball", "tennis", "golf", "olympics", "umpires",
        "swimmers", "jockeys", "wrestling", "skiers", "halftime", "scoreboards", "javelin",
        "decathlons", "lacrosse", "badminton", "surfing", "linebackers", "teammates",
    ),
    "politics": (
        "government", "democracy", "mayors", "chancellors", "democrats", "republicans",
        "lobbyists", "vetoes", "cabinets", "bureaucrats", "ambassadors", "statesmen",
        "inaugurations", "filibusters", "dictators", "monarchy", "regimes",
        "partisanship", "sanctions", "councils",
    ),
    "technology": (
        "hardware", "developers", "websites", "transistors", "downloads", "gigabytes",
        "routers", "touchscreens", "chatbots", "silicon", "electronics", "bandwidth",
        "bluetooth", "printers", "drones", "modems", "pixels", "motherboards", "spreadsheets",
        "operating systems",
    ),
    "health": (
        "physicians", "illness", "pills", "healthcare", "flu", "viruses", "asthma", "tumors",
        "dentists", "pediatricians", "immunization", "pandemics", "cholesterol", "ambulances",
        "fever", "psychiatrists", "insulin", "midwives", "obesity", "blood pressure",
    ),
    "business": (
        "finance", "commerce", "companies", "traders", "currency", "mortgages", "salaries",
        "auditors", "recession", "acquisitions", "wages", "portfolios", "creditors",
        "lenders", "tariffs", "unemployment", "payroll", "assets", "executives", "valuations",
    ),
    "arts": (
        "cinema", "pianists", "violins", "jazz", "dancers", "artists", "playwrights", "songs",
        "rappers", "hollywood", "documentaries", "composers", "exhibitions", "sitcoms",
        "vocalists", "saxophones", "murals", "portraits", "melodies", "animation",
    ),
    "food": (
        "cuisine", "meals", "ingredients", "burgers", "waiters", "pastries", "fruits",
        "steak", "rice", "snacks", "lunch", "tacos", "curry", "cafes", "seafood", "dumplings",
        "barbecue", "omelettes", "groceries", "pancakes",
    ),
    "travel": (
        "journeys", "trips", "motels", "voyages", "excursions", "campsites", "landmarks",
        "ferries", "layovers", "passengers", "inns", "safaris", "honeymoons", "lodges",
        "baggage", "airfare", "getaways", "expeditions", "jet lag", "boarding passes",
    ),
    "science": (
        "planets", "atoms", "geology", "scientists", "photons", "dinosaurs", "comets",
        "neutrons", "ecosystems", "genetics", "orbits", "zoology", "meteorites",
        "eclipses", "stars", "cells", "theories", "supernovas", "isotopes", "gravity",
    ),
    "law": (
        "attorneys", "trials", "crimes", "sheriffs", "robberies", "handcuffs", "prosecutors",
        "misdemeanors", "witnesses", "jails", "sentences", "thieves", "homicides", "manslaughter",
        "cops", "offenders", "bail", "subpoenas", "defendants", "kidnappings",
    ),
}

# Main clauses: {m} is what the text is about and decides the label.
_MAIN_TEMPLATES: tuple[str, ...] = (
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
    "What you are reading is a summary of news about {m}.",
    "The blog post explains everything about {m}.",
    "In short, the piece is about {m}.",
    "The cover story investigates {m}.",
    "The podcast guest talked at length about {m}.",
    "Page one is devoted to {m}.",
    "This explainer walks through the basics of {m}.",
    "The panel debated the future of {m}.",
)

# Main clauses that name another class only to rule it out: {x} is negated, {m} decides.
_NEGATION_TEMPLATES: tuple[str, ...] = (
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
    "The piece is not a story on {x}; it is a story on {m}.",
    "Although the title hints at {x}, the text is about {m}.",
)

# Side remarks about another class: {d} appears but does not decide the label.
_DISTRACTOR_PREFIXES: tuple[str, ...] = (
    "Although there is a brief mention of {d}, ",
    "Even with a passing nod to {d}, ",
    "Apart from one line on {d}, ",
    "Aside from a joke about {d}, ",
    "After a short detour through {d}, ",
    "While an old photo of {d} hangs on the wall, ",
)
_DISTRACTOR_SUFFIXES: tuple[str, ...] = (
    ", even though {d} get a brief mention.",
    ", with only a passing reference to {d}.",
    ", although the author usually writes about {d}.",
    ", not counting a footnote on {d}.",
    ", while a sidebar about {d} runs next to it.",
    ", and an advert for {d} interrupts it once.",
)
_DISTRACTOR_SENTENCES: tuple[str, ...] = (
    "Last week's issue was about {d}.",
    "Next week the same team will turn to {d}.",
    "A short note about {d} appears at the bottom.",
    "An advert for {d} runs alongside it.",
    "The author normally covers {d}.",
    "A reader's letter about {d} is printed on another page.",
    "The previous episode dealt with {d}.",
    "A link to an older piece on {d} sits in the margin.",
)

# Clauses that carry no class at all: they vary length and position.
_FILLER_SENTENCES: tuple[str, ...] = (
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
    "Copies were sent to subscribers this morning.",
    "The text was updated after a correction.",
    "There are a few photos as well.",
    "It reads quickly.",
    "Opinions in the office were divided.",
    "It ends with a list of further reading.",
)
_FILLER_PREFIXES: tuple[str, ...] = (
    "On Tuesday, ",
    "According to the editors, ",
    "As usual, ",
    "In the morning edition, ",
    "Once again, ",
    "To nobody's surprise, ",
    "For the second time this month, ",
    "Put simply, ",
)


@dataclass(frozen=True)
class BuiltinCorpusConfig:
    """Knobs of the generated corpus; the defaults are the benchmark."""

    num_train: int = 3000
    num_test: int = 600
    label_noise: float = 0.03
    distractor_rate: float = 0.5
    negation_rate: float = 0.35
    two_term_rate: float = 0.3
    max_distractors: int = 2
    max_fillers: int = 3
    num_classes: int = len(CLASS_NAMES)

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
    train = _generate_split(random.Random(f"fedlora-builtin/{seed}/train"), _TRAIN_TERMS, class_names, config.num_train, config)
    test = _generate_split(random.Random(f"fedlora-builtin/{seed}/test"), _TEST_TERMS, class_names, config.num_test, config)
    # A stream of its own, so the noise rate changes labels only, never texts.
    noisy = _add_label_noise(random.Random(f"fedlora-builtin/{seed}/noise"), train.labels, len(class_names), config.label_noise)
    return BuiltinCorpus(class_names, TextExamples(train.texts, noisy), test)


def _generate_split(
    rng: random.Random,
    terms: dict[str, tuple[str, ...]],
    class_names: list[str],
    count: int,
    config: BuiltinCorpusConfig,
) -> TextExamples:
    # Exactly balanced classes (up to the remainder), in random order.
    labels = [i % len(class_names) for i in range(count)]
    rng.shuffle(labels)
    texts = [_sentence(rng, terms, class_names, label, config) for label in labels]
    return TextExamples(texts, labels)


def _sentence(
    rng: random.Random,
    terms: dict[str, tuple[str, ...]],
    class_names: list[str],
    label: int,
    config: BuiltinCorpusConfig,
) -> str:
    others = [name for i, name in enumerate(class_names) if i != label]
    own = terms[class_names[label]]
    main = _mention(rng, own, config.two_term_rate)

    if rng.random() < config.negation_rate:
        core = rng.choice(_NEGATION_TEMPLATES).format(m=main, x=rng.choice(terms[rng.choice(others)]))
    else:
        core = rng.choice(_MAIN_TEMPLATES).format(m=main)

    before: list[str] = []
    after: list[str] = []
    slots = {"prefix", "suffix", "sentence"}
    for _ in range(config.max_distractors):
        if rng.random() >= config.distractor_rate:
            break
        distractor = _mention(rng, terms[rng.choice(others)], config.two_term_rate)
        where = rng.choice(sorted(slots))
        if where == "prefix":
            core = rng.choice(_DISTRACTOR_PREFIXES).format(d=distractor) + _lower_first(core)
        elif where == "suffix":
            core = core[:-1] + rng.choice(_DISTRACTOR_SUFFIXES).format(d=distractor)
        else:
            (before if rng.random() < 0.5 else after).append(rng.choice(_DISTRACTOR_SENTENCES).format(d=distractor))
        if where != "sentence":
            slots.discard(where)  # a clause wraps the main clause once from each side at most

    prefixed = False
    for _ in range(rng.randint(0, config.max_fillers)):
        roll = rng.random()
        if roll < 0.2 and not prefixed:
            core = rng.choice(_FILLER_PREFIXES) + _lower_first(core)
            prefixed = True
        elif roll < 0.6:
            before.insert(rng.randint(0, len(before)), rng.choice(_FILLER_SENTENCES))
        else:
            after.insert(rng.randint(0, len(after)), rng.choice(_FILLER_SENTENCES))
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
