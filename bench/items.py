"""Recall items: seeded needles of several kinds, BABILong-style multi-fact stories, questions about a book.

Every item is asked three ways (bench/recall.py):
  * ``statement``: the likelihood of the answer completing a sentence that states the fact (``cloze``),
    right answer vs ``wrong`` ones of the same kind (chance 1 / (1 + len(wrong)));
  * ``qa``: the likelihood of the answer as the assistant's reply to the natural ``question``;
  * ``generate``: a greedy chat answer to ``question``, right when it contains the answer.
Needle and story names, places and numbers are invented (none occurs in the public-domain filler), so the base
model cannot know them: what it recalls it has read. Book questions (``bench/data/persuasion_questions.json``)
are about Jane Austen's *Persuasion*; each names the verbatim evidence it is answered from.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Item:
    """One question about facts planted in a document."""

    task: str  # "needle/code", "qa1", "book", ...
    facts: list[str]  # the sentences planted in the document, in order (empty for a book question)
    question: str  # asked in a chat
    answer: str
    wrong: list[str]  # same-kind wrong answers for the likelihood probes
    cloze: str | None = None  # the fact stated up to its answer, "{}" where the answer goes
    positions: list[int] = field(default_factory=list)  # token index where each fact starts in the document
    depth: int | None = None  # needles: the requested number of tokens between the fact and the document's end

    def statement(self, answer: str) -> tuple[str, str]:
        """(the statement before the answer, the answer and the rest of the sentence)."""
        head, tail = self.cloze.split("{}")
        return head.rstrip(" "), (" " if head.endswith(" ") else "") + answer + tail


FIRST = (
    "Oswin",
    "Tamsin",
    "Corvin",
    "Elspeth",
    "Piran",
    "Morwenna",
    "Jory",
    "Lowenna",
    "Ansel",
    "Isolde",
    "Bram",
    "Wenna",
    "Caspian",
    "Delphine",
    "Ludo",
    "Sabine",
    "Ottilie",
    "Fenwick",
    "Rosalind",
    "Gideon",
)
LAST = (
    "Tarrant",
    "Quiller",
    "Penhallow",
    "Vexley",
    "Marrack",
    "Trevose",
    "Ashdown",
    "Kestle",
    "Rundle",
    "Polwhele",
    "Carbis",
    "Hocking",
    "Nancarrow",
    "Boscawen",
    "Trewin",
    "Lanyon",
    "Pascoe",
    "Jelbert",
    "Roskilly",
    "Vosper",
)
TOWNS = (
    "Sandmouth",
    "Kirkby Lorne",
    "Eastwold",
    "Marrowdale",
    "Fennick",
    "Saltcombe",
    "Brightholm",
    "Ashwell Cross",
    "Dunmere",
    "Penrock",
    "Willowmere",
    "Coldharbour",
    "Stavely",
    "Ravensholt",
    "Larkspur Bay",
    "Thornbury Vale",
)
CITIES = (
    "Valparaiso",
    "Trieste",
    "Bergen",
    "Smyrna",
    "Cartagena",
    "Tangier",
    "Riga",
    "Zanzibar",
    "Odessa",
    "Halifax",
    "Marseille",
    "Goa",
    "Manila",
    "Danzig",
    "Aleppo",
    "Quebec",
)
ROLES = (
    "lighthouse keeper",
    "harbour master",
    "village schoolmaster",
    "ferryman",
    "night watchman",
    "bell-ringer",
    "innkeeper",
    "toll collector",
    "postmistress",
    "clockmaker",
)
BUILDINGS = ("stone bridge", "old mill", "chapel", "grammar school", "market hall", "windmill", "almshouse", "granary")
OBJECTS = (
    "silver locket",
    "brass key",
    "pearl brooch",
    "leather journal",
    "ivory chess piece",
    "copper compass",
    "velvet purse",
    "glass vial",
    "tin soldier",
    "jade ring",
    "pocket watch",
    "wax seal",
)
KEEPSAKES = ("sea charts", "letters", "savings", "pistols", "jewels", "ledgers", "medals", "maps")
ADJECTIVES = (
    "amber",
    "blue",
    "crimson",
    "dusty",
    "golden",
    "hidden",
    "ivory",
    "lunar",
    "misty",
    "olive",
    "quiet",
    "rusty",
    "silver",
    "violet",
    "wild",
    "jade",
)
ANIMALS = (
    "badger",
    "crane",
    "falcon",
    "gecko",
    "heron",
    "ibis",
    "jackal",
    "koala",
    "lynx",
    "marten",
    "newt",
    "otter",
    "puffin",
    "raven",
    "stoat",
    "walrus",
)
WORDS = (
    "velvet",
    "harbor",
    "copper",
    "lantern",
    "meadow",
    "thistle",
    "ember",
    "glacier",
    "orchid",
    "saffron",
    "timber",
    "quartz",
    "willow",
    "cobalt",
    "falcon",
    "marble",
)
TRADES = ("baker", "cobbler", "tailor", "apothecary", "blacksmith", "chandler", "saddler", "vintner")
UNITS = ("shillings", "guineas", "crowns", "sovereigns")


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _distinct(rng: random.Random, make: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        if (v := make()) not in out:
            out.append(v)
    return out


# kind -> (key maker, value maker, [(fact sentence, cloze)], question); "{k}" is the key, "{v}" the value.
KINDS: dict[str, tuple[Callable, Callable, list[tuple[str, str]], str]] = {
    "code": (
        lambda r: f"the {r.choice(ADJECTIVES)} {r.choice(ANIMALS)}",
        lambda r: str(r.randrange(10000, 100000)),
        [
            ("The secret code of {k} is {v}.", "The secret code of {k} is {}."),
            ("Remember that the code for {k} is {v}.", "The code for {k} is {}."),
        ],
        "What is the secret code of {k}?",
    ),
    "name": (
        lambda r: f"the {r.choice(ROLES)} of {r.choice(TOWNS)}",
        _person,
        [
            ("In those years {k} was a person named {v}.", "{K} was named {}."),
            ("Everyone knew that {k} was called {v}.", "{K} was called {}."),
        ],
        "What was the name of {k}?",
    ),
    "place": (
        lambda r: f"{_person(r)}'s {r.choice(KEEPSAKES)}",
        lambda r: r.choice(CITIES),
        [
            ("For safety, {k} were kept in a locked chest in {v}.", "{K} were kept in {}."),
            ("It was in {v} that {k} were hidden.", "{K} were hidden in {}."),
        ],
        "In which city were {k} kept?",
    ),
    "year": (
        lambda r: f"the {r.choice(BUILDINGS)} at {r.choice(TOWNS)}",
        lambda r: str(r.randrange(1600, 1790)),
        [
            ("{K} was built in the year {v}.", "{K} was built in the year {}."),
            ("Records show that work on {k} was finished in {v}.", "{K} was finished in {}."),
        ],
        "In what year was {k} built?",
    ),
    "object": (
        lambda r: f"{_person(r)}",
        lambda r: r.choice(OBJECTS),
        [
            ("Under the loose floorboard, {k} had hidden a {v}.", "{K} had hidden a {}."),
            ("Beneath the floorboards of the parlour, {k} kept a {v}.", "{K} had hidden a {}."),
        ],
        "What had {k} hidden under the floorboard?",
    ),
    "password": (
        lambda r: f"the {r.choice(('archive', 'vault', 'cellar', 'observatory', 'study'))} at {r.choice(TOWNS)}",
        lambda r: f"{r.choice(WORDS)}-{r.choice(WORDS)}-{r.randrange(10, 100)}",
        [
            ("The password to {k} is {v}.", "The password to {k} is {}."),
            ("To open {k} one had to say {v}.", "The password to {k} is {}."),
        ],
        "What is the password to {k}?",
    ),
    "debt": (
        lambda r: f"{_person(r)} owed the {r.choice(TRADES)}",
        lambda r: f"{r.randrange(11, 99)} {r.choice(UNITS)}",
        [("By spring, {k} {v}.", "{K} {}."), ("It was said that {k} no less than {v}.", "{K} {}.")],
        "How much money was it that {k}?",
    ),
}


def _fill(template: str, key: str, value: str = "{}") -> str:
    return template.replace("{K}", key[0].upper() + key[1:]).replace("{k}", key).replace("{v}", value)


def make_needles(rng: random.Random, n: int, wrong: int = 5, kinds: Sequence[str] = tuple(KINDS)) -> list[Item]:
    """``n`` needles cycling through ``kinds``, distinct keys, each with ``wrong`` distinct wrong values."""
    items: list[Item] = []
    keys: set[str] = set()
    for i in range(n):
        kind = kinds[i % len(kinds)]
        make_key, make_value, shapes, question = KINDS[kind]
        while (key := make_key(rng)) in keys:
            pass
        keys.add(key)
        value, *others = _distinct(rng, lambda make=make_value: make(rng), wrong + 1)
        fact, cloze = rng.choice(shapes)
        items.append(
            Item(
                f"needle/{kind}",
                [_fill(fact, key, value)],
                _fill(question, key) + " Answer briefly.",
                value,
                others,
                _fill(cloze, key),
            )
        )
    return items


# the stories' people: none is a needle's person or in the filler novels, so "Where is P?" is about one story
PEOPLE = (
    "Aurelio",
    "Benedikt",
    "Cosima",
    "Dariel",
    "Emrys",
    "Fiora",
    "Hallam",
    "Ines",
    "Jasper",
    "Kestrel",
    "Marisol",
    "Niamh",
    "Orrin",
    "Perpetua",
    "Quentin",
    "Soren",
    "Thaddeus",
    "Viggo",
    "Xanthe",
    "Yannick",
)
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
THINGS = ("football", "apple", "milk", "umbrella", "lantern", "basket", "kettle", "violin", "satchel", "compass")
GO = ("went to", "journeyed to", "moved to", "travelled to")
MAX_STORIES = min(len(PEOPLE) // 2, len(THINGS))  # stories one document can hold (each its own people and thing)


def make_stories(rng: random.Random, n: int, tasks: Sequence[str] = ("qa1", "qa2", "qa3")) -> list[Item]:
    """BABILong-style stories (bAbI qa1-qa3): each needs one, two or three of its facts; answers are locations.

    qa1 "Where is P?" after P moved twice (the later move counts) and Q moved once; qa2 "Where is the T?" after P
    picked the T up and then went somewhere; qa3 "Where was the T before the L?" after P picked it up and went to
    two places. Wrong answers are the other locations, the stale one among them. No person or thing is in two
    stories (the stories share a document: a second story moving P would change where P is).
    """
    people, things = rng.sample(PEOPLE, len(PEOPLE)), rng.sample(THINGS, len(THINGS))
    if n > MAX_STORIES:
        raise ValueError(f"at most {MAX_STORIES} stories share a document")
    items = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        p, q, thing = people.pop(), people.pop(), things.pop()
        a, b, c = rng.sample(LOCATIONS, 3)
        go = lambda: rng.choice(GO)
        if task == "qa1":
            facts = [f"{p} {go()} the {a}.", f"{q} {go()} the {b}.", f"{p} {go()} the {c}."]
            question, answer, cloze = f"Where is {p}?", c, f"{p} is in the {{}}."
        elif task == "qa2":
            facts = [f"{p} picked up the {thing}.", f"{q} {go()} the {b}.", f"{p} {go()} the {a}."]
            question, answer, cloze = f"Where is the {thing}?", a, f"The {thing} is in the {{}}."
        else:
            facts = [
                f"{p} {go()} the {c}.",
                f"{p} picked up the {thing}.",
                f"{p} {go()} the {a}.",
                f"{p} {go()} the {b}.",
            ]
            question, answer, cloze = (
                f"Where was the {thing} before the {b}?",
                a,
                f"Before the {b}, the {thing} was in the {{}}.",
            )
        wrong = [loc for loc in LOCATIONS if loc != answer]
        items.append(Item(task, facts, question + " Answer with one word.", answer, wrong, cloze))
    return items


def sentence_starts(tokenizer, tokens: Sequence[int]) -> list[int]:
    """Token indices where a new sentence begins: after a token ending in . ! ? (or a closing quote after one)
    and at a token that starts with a space or a newline."""
    text = [tokenizer.decode([t]) for t in tokens]
    return [
        i
        for i in range(1, len(tokens))
        if text[i - 1].rstrip("\"'").endswith((".", "!", "?")) and text[i][:1] in (" ", "\n")
    ]


def plant(tokenizer, filler: Sequence[int], facts: Sequence[tuple[int, str]]) -> tuple[list[int], list[int]]:
    """Insert each (target token index in ``filler``, sentence) at the first sentence start at or after it.

    Returns the document's tokens and where each sentence starts in it (in ``facts`` order). Each sentence is
    tokenized with a leading space, as it would be inside running text.
    """
    starts = sentence_starts(tokenizer, filler)
    order = sorted(range(len(facts)), key=lambda i: facts[i][0])
    doc: list[int] = []
    positions = [0] * len(facts)
    taken = 0
    for i in order:
        target, sentence = facts[i]
        at = max(next((s for s in starts if s >= target), len(filler)), taken)
        doc += filler[taken:at]
        taken = at
        positions[i] = len(doc)
        doc += tokenizer(" " + sentence, add_special_tokens=False).input_ids
    return doc + list(filler[taken:]), positions


def needle_document(
    tokenizer,
    filler: Sequence[int],
    length: int,
    depths: Sequence[int],
    per_depth: int,
    stories: int,
    clear: int,
    rng: random.Random,
    wrong: int = 5,
) -> tuple[list[int], list[Item]]:
    """About ``length`` tokens of ``filler`` with ``per_depth`` needles at each depth (tokens before the end)
    smaller than ``length``, and ``stories`` stories whose facts are scattered over all but the last ``clear``
    tokens (keep it at least the window, so that no story is answered from the window)."""
    depths = [d for d in depths if d < length]
    needles = make_needles(rng, per_depth * len(depths), wrong)
    tales = make_stories(rng, stories)
    planted: list[tuple[Item, int, str]] = []
    for i, item in enumerate(needles):
        item.depth = depths[i // per_depth]
        planted.append((item, length - item.depth, item.facts[0]))
    for item in tales:
        spots = sorted(rng.randrange(0, max(1, length - clear)) for _ in item.facts)
        planted += [(item, at, fact) for at, fact in zip(spots, item.facts, strict=True)]
    inserted = sum(len(tokenizer(" " + f, add_special_tokens=False).input_ids) for _, _, f in planted)
    if len(filler) < length - inserted:
        raise ValueError(f"{len(filler)} filler tokens cannot make a {length}-token document")
    doc, positions = plant(tokenizer, filler[: length - inserted], [(at, f) for _, at, f in planted])
    for (item, _, _), at in zip(planted, positions, strict=True):
        item.positions.append(at)
    return doc, needles + tales


BOOK = Path(__file__).resolve().parent / "data" / "persuasion.txt"
BOOK_QUESTIONS = BOOK.with_name("persuasion_questions.json")


def book_items(tokenizer, tokens: int | None = None) -> tuple[list[int], list[Item]]:
    """The first ``tokens`` tokens of the book (all by default) and the questions whose evidence lies within them.

    An item's position is the token where its evidence starts.
    """
    text = BOOK.read_text(encoding="utf-8")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids[:tokens] if tokens else enc.input_ids
    starts = [a for a, _ in enc.offset_mapping]
    items = []
    for q in json.loads(BOOK_QUESTIONS.read_text(encoding="utf-8")):
        at = text.index(q["evidence"])
        first = bisect.bisect_right(starts, at) - 1  # the token holding the evidence's first character
        last = bisect.bisect_left(starts, at + len(q["evidence"]))
        if last <= len(ids):
            items.append(
                Item("book", [], q["question"] + " Answer briefly.", q["answer"], q["wrong"], q["cloze"], [first])
            )
    return ids, items
