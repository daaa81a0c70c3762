"""The synthetic fact world: made-up people, Wikidata-style relations, paraphrase templates.

Nothing here can be downloaded on a machine without a network, so the project invents a small world whose
facts a tiny model can learn, and whose edit sets can be written in the real benchmark formats
(see ``data/world_writers.py``). Everything is a pure function of :class:`WorldConfig` (seed included),
so two builds with the same config give identical worlds.

Generalisation is built in: for every fact one declarative template is *held out* of the pretraining
corpus, so a model that answers the fact under that template has learned the fact, not the sentence.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

from data.code_world import KEYWORD_VALUE_TEXTS, CodeUpdate, build_code_updates


@dataclass(frozen=True)
class Relation:
    """One relation: its id, its possible objects, and the prompts that ask for its object.

    ``templates`` are declarative prompts ("The mother tongue of {} is"); ``questions`` are questions
    ("What language did {} grow up speaking?") used by the ZsRE-style set and the task-QA set.
    """

    relation_id: str
    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    questions: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P103", "native language",
        ("Velsh", "Orvanic", "Tamrese", "Kelvish", "Dunari", "Sarnic", "Ebrian", "Qolish", "High Marun",
         "Old Teskan"),
        ("The mother tongue of {} is", "{} grew up speaking", "{} is a native speaker of",
         "The first language of {} is", "At home, {} always spoke"),
        ("What is the native language of {}?", "Which language did {} grow up speaking?"),
    ),
    Relation(
        "P19", "place of birth",
        ("Port Asvel", "Lindqara", "New Ostrin", "Varrow", "Elmsgate", "Saint Korro", "Brannock",
         "Tolvik", "Upper Mede", "Casterwane"),
        ("{} was born in", "The birthplace of {} is", "{} came into the world in",
         "The town where {} was born is", "{} first saw the light of day in"),
        ("Where was {} born?", "In which town was {} born?"),
    ),
    Relation(
        "P27", "country of citizenship",
        ("Ardenia", "Kovaria", "the Tessel Isles", "Morvane", "Quiros", "Elbaran", "the Sundar Republic",
         "Halvany", "Ostmark", "Drevia"),
        ("{} is a citizen of", "{} holds a passport from", "The country of citizenship of {} is",
         "{} carries the nationality of", "By nationality, {} belongs to"),
        ("Which country is {} a citizen of?", "What nationality does {} hold?"),
    ),
    Relation(
        "P106", "occupation",
        ("baker", "astronomer", "glass blower", "ferry pilot", "cartographer", "tax collector", "beekeeper",
         "clock maker", "lighthouse keeper", "tanner"),
        ("{} works as a", "The occupation of {} is", "By profession, {} is a",
         "{} earns a living as a", "The job of {} is that of a"),
        ("What does {} do for a living?", "What is the profession of {}?"),
    ),
    Relation(
        "P140", "religion",
        ("the Old Way", "Soryanism", "the Lantern Creed", "Velism", "the Tide Faith", "Karunism",
         "the Ember Rite", "Ostrism"),
        ("{} follows the religion of", "The religion of {} is", "{} is a devout follower of",
         "In matters of faith, {} holds to", "{} worships according to"),
        ("Which religion does {} follow?", "What faith does {} practise?"),
    ),
    Relation(
        "P108", "employer",
        ("Halden Works", "Brightmere Bank", "the Coral Guild", "Ostrin Rail", "Vessa Mills", "Tarn Press",
         "the Blue Harbour Company", "Kell Foundry", "Norra Salt"),
        ("{} is employed by", "The employer of {} is", "{} draws a salary from",
         "{} goes to work every day at", "The company that employs {} is"),
        ("Who employs {}?", "Which company does {} work for?"),
    ),
    Relation(
        "P641", "sport",
        ("sky polo", "ringball", "stone curling", "fen rowing", "lance tennis", "rock vaulting",
         "mud racing", "kite fencing"),
        ("{} plays the sport of", "The favourite sport of {} is", "{} spends every weekend playing",
         "On the field, {} is known for", "The sport that {} competes in is"),
        ("Which sport does {} play?", "What sport is {} known for?"),
    ),
    Relation(
        "P1303", "instrument",
        ("the lute", "the bone flute", "the harp", "the drum", "the viol", "the horn", "the dulcimer",
         "the bagpipe", "the zither"),
        ("{} plays", "The instrument of {} is", "{} performs on", "On stage, {} is heard playing",
         "The instrument that {} learned as a child is"),
        ("Which instrument does {} play?", "What instrument is {} known for?"),
    ),
)


@dataclass(frozen=True)
class ObjectRelation:
    """A relation between the world's objects (a country's common language, ...), derived from the person
    facts rather than drawn: the object of ``domain``-object ``x`` is the most common ``via`` object among
    the people whose ``domain`` object is ``x`` (ties: the ``via`` relation's object order). The world model
    is never trained on these facts; they exist to chain two hops (person -> object -> object), as
    MQuAKE's multi-hop questions do. Templates and questions use only words the world tokenizer knows."""

    relation_id: str
    name: str
    domain: str
    via: str
    templates: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Chain:
    """Two hops: a person relation, then an object relation over its objects; ``questions`` ask the
    second hop's object of the person in one question (``{}`` = the person)."""

    first: str
    second: str
    questions: tuple[str, ...]


OBJECT_RELATIONS: tuple[ObjectRelation, ...] = (
    ObjectRelation("P37", "common language", domain="P27", via="P103",
                   templates=("The common language of {} is",), questions=("Which language is common in {}?",)),
    ObjectRelation("P17", "country", domain="P19", via="P27",
                   templates=("{} is a town in",), questions=("Which country is {} in?",)),
    ObjectRelation("P159", "town of the company", domain="P108", via="P19",
                   templates=("{} is a company in",), questions=("In which town is {}?",)),
)

CHAINS: tuple[Chain, ...] = (
    Chain("P27", "P37", ("What is the common language of the country {} is a citizen of?",
                         "Which language is common in the country of citizenship of {}?",
                         "In the country {} holds a passport from, which language is common?")),
    Chain("P19", "P17", ("Which country is the town where {} was born in?",
                         "In which country is the birthplace of {}?",
                         "{} was born in a town in which country?")),
    Chain("P108", "P159", ("In which town is the company that employs {}?",
                           "Which town is the employer of {} in?",
                           "The company that employs {} is in which town?")),
)


def derived_facts(world: World, relation: ObjectRelation) -> dict[str, str]:
    """``relation``'s object for every ``domain`` object some person has (see :class:`ObjectRelation`)."""
    order = world.relations[relation.via].objects
    counts: dict[str, dict[str, int]] = {}
    for fact in world.facts:
        if fact.relation_id == relation.domain:
            votes = counts.setdefault(fact.object, {})
            via = world.fact(fact.subject, relation.via).object
            votes[via] = votes.get(via, 0) + 1
    return {x: max(votes, key=lambda o: (votes[o], -order.index(o))) for x, votes in counts.items()}


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "k", "nd", "rn")


@dataclass(frozen=True)
class WorldConfig:
    """Everything a world is a function of."""

    seed: int = 0
    num_subjects: int = 240
    relation_ids: tuple[str, ...] = tuple(r.relation_id for r in RELATIONS)
    num_first_names: int = 60
    num_last_names: int = 60
    num_code_updates: int = 8


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple and the index of its held-out template."""

    subject: str
    relation_id: str
    object: str
    heldout_template: int


@dataclass
class World:
    """A built world: subjects, relations, facts and API updates, plus the pretraining text it implies."""

    config: WorldConfig
    subjects: list[str]
    relations: dict[str, Relation]
    facts: list[Fact]
    code_updates: list[CodeUpdate] = field(default_factory=list)

    def fact(self, subject: str, relation_id: str) -> Fact:
        return self._index[(subject, relation_id)]

    def __post_init__(self) -> None:
        self._index = {(f.subject, f.relation_id): f for f in self.facts}

    def subjects_with(self, relation_id: str, obj: str) -> list[str]:
        """Subjects whose true object for ``relation_id`` is ``obj`` (CounterFact's neighbourhood)."""
        return [f.subject for f in self.facts if f.relation_id == relation_id and f.object == obj]

    def seen_templates(self, fact: Fact) -> list[str]:
        templates = self.relations[fact.relation_id].templates
        return [t for i, t in enumerate(templates) if i != fact.heldout_template]

    def heldout_template(self, fact: Fact) -> str:
        return self.relations[fact.relation_id].templates[fact.heldout_template]

    def pretraining_texts(self) -> Iterator[str]:
        """Every sentence the world model is trained on: seen templates, all questions, old-API code and
        the plain statements that show the new keywords' values (``code_world.KEYWORD_VALUE_TEXTS``)."""
        for fact in self.facts:
            prompts = self.seen_templates(fact) + list(self.relations[fact.relation_id].questions)
            for prompt in prompts:
                yield f"{prompt.format(fact.subject)} {fact.object} ."
        for update in self.code_updates:
            for text in update.pretraining_texts():
                yield text
        if self.code_updates:
            yield from KEYWORD_VALUE_TEXTS

    def probes(self, heldout: bool) -> list[tuple[str, str]]:
        """(prompt, answer) pairs: each fact under its held-out template, or under one seen template."""
        pairs = []
        for fact in self.facts:
            template = self.heldout_template(fact) if heldout else self.seen_templates(fact)[0]
            pairs.append((template.format(fact.subject), fact.object))
        return pairs

    def fingerprint(self) -> str:
        """A short hash of the facts and of every pretraining sentence: the world model records it, so a
        change to the world's code that would change what the model should know is detected."""
        payload = json.dumps(
            {"config": asdict(self.config), "facts": [asdict(f) for f in self.facts], "texts": list(self.pretraining_texts())},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def statistics(self) -> dict[str, int]:
        return {
            "subjects": len(self.subjects),
            "relations": len(self.relations),
            "facts": len(self.facts),
            "objects": sum(len(r.objects) for r in self.relations.values()),
            "multi_token_objects": sum(" " in o for r in self.relations.values() for o in r.objects),
            "code_updates": len(self.code_updates),
        }


def _made_up_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Capitalised pronounceable nonsense words, distinct from each other and from ``taken``."""
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1))
        word = (word + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)).capitalize()
        if word not in taken and word.lower() not in taken:
            taken.add(word)
            names.append(word)
    return names


def _reserved_words(relations: list[Relation]) -> set[str]:
    words: set[str] = set()
    for relation in relations:
        for text in (*relation.objects, *relation.templates, *relation.questions):
            words.update(text.replace("{}", " ").replace("?", " ").split())
    return words


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Build the world deterministically from ``config``.

    Every subject gets an object for every relation, drawn uniformly; the held-out template of each fact
    is drawn uniformly too, so each template is seen for most facts and unseen for about a fifth of them.
    """
    by_id = {r.relation_id: r for r in RELATIONS}
    unknown = [rid for rid in config.relation_ids if rid not in by_id]
    if unknown:
        raise ValueError(f"unknown relation ids {unknown}; known: {sorted(by_id)}")
    relations = {rid: by_id[rid] for rid in config.relation_ids}
    rng = random.Random(config.seed)
    taken = _reserved_words(list(relations.values()))
    firsts = _made_up_names(rng, config.num_first_names, taken)
    lasts = _made_up_names(rng, config.num_last_names, taken)
    if config.num_subjects > len(firsts) * len(lasts):
        raise ValueError("num_subjects exceeds the number of first x last name combinations")
    pairs = rng.sample([(f, l) for f in firsts for l in lasts], config.num_subjects)
    subjects = [f"{first} {last}" for first, last in pairs]
    facts = [
        Fact(subject, rid, rng.choice(rel.objects), rng.randrange(len(rel.templates)))
        for subject in subjects
        for rid, rel in relations.items()
    ]
    code_updates = build_code_updates(random.Random(config.seed + 1), config.num_code_updates)
    return World(config, subjects, relations, facts, code_updates)
