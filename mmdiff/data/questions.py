"""Question families about a :class:`~mmdiff.data.scenes.Scene`, with answers computed from the scene.

Each family is a function ``(scene, rng) -> QA | None`` registered under its name in
:data:`FAMILIES`; ``None`` means the scene offers no valid question of that family (e.g. no object
can be described uniquely). Answers are short, lower case and canonical (one string each).

Templates (``{noun}`` is an optional size, optional colour and a shape or "object", e.g.
"large circle", "blue object", "small red square"; plurals add "s" / "es"):

* attribute:   "what color is the {noun}?" / "what shape is the {noun}?" / "what size is the {noun}?"
* existence:   "is there a {noun}?"
* count:       "how many {nouns} are there?"  -> "0".."6"
* position:    "where is the {noun}?"          -> one of POSITIONS
* relation:    "what is directly left of|right of|above|below the {noun}?" -> "red circle" / "nothing";
               "is the {noun} left of|right of|above|below the {noun}?"
* comparison:  "are there more {nouns} than {nouns}?" / "are there fewer ... than ...?" /
               "are there as many {nouns} as {nouns}?"
* verify:      "{attribute|count|position|relation question} answer: {proposal}. is that right?"
* caption:     "describe the image."          -> :func:`caption_text`
* caption_json:"describe the image in json."  -> :func:`caption_json`

Whenever a question names an object, its description picks exactly one object of the scene.
Yes/no families choose the target answer first, so "yes" and "no" are balanced.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence, TypeVar

from ..registry import Registry
from ..tasks.prompts import CAPTION_JSON_QUESTION, CAPTION_QUESTION, NO, YES, verification_question
from .scenes import COLOURS, GRID, POSITIONS, SHAPES, SIZES, Obj, Scene, sample_scene

T = TypeVar("T")

NOTHING = "nothing"  # relation answer when the adjacent cell is empty
MAX_COUNT = 6
ZERO_COUNT_WEIGHT = 0.5  # count questions: relative weight of target answer "0" vs each other count
NOTHING_RATE = 0.25  # share of "what is directly ... of" questions whose answer is NOTHING

#: relation word -> (row step, column step) of the adjacent cell
DIRECTIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                            "cross": "crosses", "object": "objects"}


@dataclass
class QA:
    """A question with its accepted answers.

    Args:
        question: the question text, lower case.
        answers: accepted answers; the first is canonical.
        type: the question family, one of :data:`QUESTION_TYPES` (or "asr" in datasets).
        focus: the cells (reading-order indices) the question is about, in up to three groups: the
            object(s) it names first, then the second object or group (relation, comparison), then
            (relations) the region the relation selects: every grid cell, empty or not, that stands in
            the asked relation to the reference object. Training uses them as grounding targets; they
            are never shown to the model.
    """

    question: str
    answers: list[str]
    type: str
    focus: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Filter:
    """A set of attribute constraints selecting objects ("small red", "circle", all objects, ...).

    Args:
        size: required size or None.
        colour: required colour or None.
        shape: required shape or None.
    """

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: Obj) -> bool:
        """Whether ``obj`` satisfies every constraint."""
        return ((self.size is None or obj.size == self.size) and (self.colour is None or obj.colour == self.colour)
                and (self.shape is None or obj.shape == self.shape))

    def count(self, scene: Scene) -> int:
        """Number of objects of ``scene`` selected by the filter."""
        return sum(self.matches(o) for o in scene.objects)

    def cells(self, scene: Scene) -> tuple[int, ...]:
        """Cells of the objects of ``scene`` selected by the filter."""
        return tuple(o.cell for o in scene.objects if self.matches(o))

    def noun(self, plural: bool = False) -> str:
        """Noun phrase without article: "small red circle", "blue object", "crosses".

        Args:
            plural: return the plural form.
        """
        head = self.shape or "object"
        words = [w for w in (self.size, self.colour) if w is not None]
        return " ".join(words + [_PLURALS[head] if plural else head])

    @classmethod
    def of(cls, obj: Obj, attributes: Iterable[str]) -> Filter:
        """The filter that requires ``obj``'s values for ``attributes`` ("size", "colour", "shape")."""
        return cls(**{a: getattr(obj, a) for a in attributes})


#: attribute subsets used to describe objects or groups of objects, most specific last
_KINDS: tuple[tuple[str, ...], ...] = (
    (), ("shape",), ("colour",), ("size",), ("size", "shape"), ("colour", "shape"), ("size", "colour"),
    ("size", "colour", "shape"),
)
_VALUES: dict[str, tuple[str, ...]] = {"size": SIZES, "colour": COLOURS, "shape": SHAPES}


def _filters_of_kind(kind: tuple[str, ...]) -> list[Filter]:
    """Every filter constraining exactly the attributes in ``kind``."""
    filters = [Filter()]
    for attr in kind:
        filters = [replace(f, **{attr: v}) for f in filters for v in _VALUES[attr]]
    return filters


def article(noun: str) -> str:
    """``noun`` with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def referring_filters(scene: Scene, obj: Obj, *, exclude: str | None = None) -> list[Filter]:
    """Descriptions of ``obj`` that select it and nothing else in ``scene``.

    Args:
        scene: the scene containing ``obj``.
        obj: the object to describe.
        exclude: an attribute the description must not use (the one being asked about).
    """
    return [f for kind in _KINDS[1:] if exclude not in kind
            for f in [Filter.of(obj, kind)] if f.count(scene) == 1]


def _pick_balanced(rng: random.Random, candidates: Sequence[tuple[str, str, T]],
                   targets: Sequence[str] = (YES, NO),
                   weights: Sequence[float] | None = None, fallback: bool = True) -> tuple[str, T] | None:
    """Choose an (answer, payload) pair: first a target answer, then a kind, then a payload.

    Sampling the answer first balances the answer distribution whatever the scene; the kind
    layer keeps rare kinds (few candidates) from being drowned by common ones. When the
    target answer has no candidate, the other answers are used (or None without ``fallback``).

    Args:
        rng: random source.
        candidates: (answer, kind, payload) triples.
        targets: the answers to balance between.
        weights: relative weight of each target answer (uniform by default).
        fallback: when the target answer has no candidate, use the others instead of returning None.
    """
    if not candidates:
        return None
    target = rng.choices(list(targets), weights=weights)[0]
    pool = [c for c in candidates if c[0] == target] or (list(candidates) if fallback else [])
    if not pool:
        return None
    kinds = list(dict.fromkeys(c[1] for c in pool))
    kind = rng.choice(kinds)
    answer, _, payload = rng.choice([c for c in pool if c[1] == kind])
    return answer, payload


def _described_objects(scene: Scene) -> list[tuple[Obj, list[Filter]]]:
    """Objects that can be described uniquely, with their descriptions."""
    out = []
    for o in scene.objects:
        refs = referring_filters(scene, o)
        if refs:
            out.append((o, refs))
    return out


def _neighbour_name(scene: Scene, obj: Obj, relation: str) -> str | None:
    """Colour and shape of the object adjacent to ``obj`` in direction ``relation``.

    Returns NOTHING for an empty adjacent cell and None when the adjacent cell is off the grid.
    """
    dr, dc = DIRECTIONS[relation]
    r, c = obj.row + dr, obj.col + dc
    if not (0 <= r < GRID and 0 <= c < GRID):
        return None
    other = scene.at(r, c)
    return other.describe() if other is not None else NOTHING


def holds(a: Obj, relation: str, b: Obj) -> bool:
    """Whether ``a`` is ``relation`` ("above", "left of", ...) ``b``: strictly smaller/larger row/column."""
    dr, dc = DIRECTIONS[relation]
    if dr:
        return (a.row - b.row) * dr > 0
    return (a.col - b.col) * dc > 0


# --- question families --------------------------------------------------------------------------

FAMILIES: Registry[Callable[[Scene, random.Random], QA | None]] = Registry("question type")


@FAMILIES.register("attribute")
def attribute_question(scene: Scene, rng: random.Random) -> QA | None:
    """Ask the colour, shape or size of an object described without that attribute."""
    attrs = ["colour", "shape", "size"]
    rng.shuffle(attrs)
    objects = list(scene.objects)
    rng.shuffle(objects)
    for attr in attrs:
        for obj in objects:
            refs = referring_filters(scene, obj, exclude=attr)
            if refs:
                word = "color" if attr == "colour" else attr
                ref = rng.choice(refs)
                return QA(f"what {word} is the {ref.noun()}?", [getattr(obj, attr)], "attribute", ((obj.cell,),))
    return None


@FAMILIES.register("existence")
def existence_question(scene: Scene, rng: random.Random) -> QA:
    """Ask whether an object matching a description exists; yes/no balanced."""
    kinds = (("colour", "shape"), ("shape",), ("colour",), ("size", "colour", "shape"))
    candidates = [(YES if f.count(scene) else NO, kind, f) for kind in kinds for f in _filters_of_kind(kind)]
    answer, f = _pick_balanced(rng, candidates)  # type: ignore[misc]
    return QA(f"is there {article(f.noun())}?", [answer], "existence", (f.cells(scene),))


@FAMILIES.register("count")
def count_question(scene: Scene, rng: random.Random) -> QA:
    """Ask how many objects match a filter; the target count is sampled first (0 down-weighted)."""
    candidates = [(str(f.count(scene)), kind, f) for kind in _KINDS[:-1] for f in _filters_of_kind(kind)]
    achievable = sorted({c[0] for c in candidates}, key=int)
    weights = [ZERO_COUNT_WEIGHT if a == "0" else 1.0 for a in achievable]
    answer, f = _pick_balanced(rng, candidates, targets=achievable, weights=weights)  # type: ignore[misc]
    return QA(f"how many {f.noun(plural=True)} are there?", [answer], "count", (f.cells(scene),))


@FAMILIES.register("position")
def position_question(scene: Scene, rng: random.Random) -> QA | None:
    """Ask the cell name of a uniquely described object."""
    described = _described_objects(scene)
    if not described:
        return None
    obj, refs = rng.choice(described)
    return QA(f"where is the {rng.choice(refs).noun()}?", [obj.position], "position", ((obj.cell,),))


def _neighbour_question(scene: Scene, rng: random.Random) -> QA | None:
    """"what is directly <relation> the X?" -> neighbour's colour and shape, or NOTHING.

    NOTHING is the target answer with probability NOTHING_RATE; there is no fallback between the
    two answers (a one-object scene would otherwise only ever give NOTHING), so this returns None
    when the drawn target is impossible.
    """
    candidates = []
    for obj, refs in _described_objects(scene):
        for relation in DIRECTIONS:
            name = _neighbour_name(scene, obj, relation)
            if name is not None:
                candidates.append((NOTHING if name == NOTHING else "object", relation, (obj, refs, relation, name)))
    picked = _pick_balanced(rng, candidates, targets=("object", NOTHING), weights=(1 - NOTHING_RATE, NOTHING_RATE),
                            fallback=False)
    if picked is None:
        return None
    obj, refs, relation, name = picked[1]
    dr, dc = DIRECTIONS[relation]
    neighbour = (obj.row + dr) * GRID + obj.col + dc
    return QA(f"what is directly {relation} the {rng.choice(refs).noun()}?", [name], "relation",
              ((obj.cell,), (neighbour,), (neighbour,)))


def _pair_question(scene: Scene, rng: random.Random) -> QA | None:
    """"is the X <relation> the Y?" -> yes/no, balanced."""
    described = _described_objects(scene)
    candidates = [(YES if holds(a, rel, b) else NO, rel, (a, ra, rel, b, rb))
                  for a, ra in described for b, rb in described if a is not b for rel in DIRECTIONS]
    picked = _pick_balanced(rng, candidates)
    if picked is None:
        return None
    answer, (a, ra, rel, b, rb) = picked
    return QA(f"is the {rng.choice(ra).noun()} {rel} the {rng.choice(rb).noun()}?", [answer], "relation",
              ((a.cell,), (b.cell,), region(b, rel)))


def region(ref: Obj, relation: str) -> tuple[int, ...]:
    """Every grid cell (empty or not) that is ``relation`` the object ``ref``, in the sense of :func:`holds`."""
    dr, dc = DIRECTIONS[relation]
    return tuple(r * GRID + c for r in range(GRID) for c in range(GRID)
                 if ((r - ref.row) * dr > 0 if dr else (c - ref.col) * dc > 0))


@FAMILIES.register("relation")
def relation_question(scene: Scene, rng: random.Random) -> QA | None:
    """Half "what is directly <rel> the X?", half "is the X <rel> the Y?" (falls back to the other)."""
    first, second = (_neighbour_question, _pair_question) if rng.random() < 0.5 else (_pair_question, _neighbour_question)
    return first(scene, rng) or second(scene, rng)


#: comparison template -> (question format, predicate on (count a, count b))
COMPARISONS: dict[str, tuple[str, Callable[[int, int], bool]]] = {
    "more": ("are there more {a} than {b}?", lambda x, y: x > y),
    "fewer": ("are there fewer {a} than {b}?", lambda x, y: x < y),
    "as many": ("are there as many {a} as {b}?", lambda x, y: x == y),
}


@FAMILIES.register("comparison")
def comparison_question(scene: Scene, rng: random.Random) -> QA:
    """Compare the counts of two groups of the same kind (shapes, colours or sizes); yes/no balanced.

    Pairs where both groups are empty are skipped (they make "as many" trivially true).
    """
    name = rng.choice(list(COMPARISONS))
    template, predicate = COMPARISONS[name]
    candidates = []
    for kind in (("shape",), ("colour",), ("size",)):
        filters = _filters_of_kind(kind)
        for fa in filters:
            for fb in filters:
                ca, cb = fa.count(scene), fb.count(scene)
                if fa != fb and max(ca, cb) > 0:
                    candidates.append((YES if predicate(ca, cb) else NO, kind[0], (fa, fb)))
    answer, (fa, fb) = _pick_balanced(rng, candidates)  # type: ignore[misc]
    return QA(template.format(a=fa.noun(plural=True), b=fb.noun(plural=True)), [answer], "comparison",
              (fa.cells(scene), fb.cells(scene)))


#: the operators a question can apply to its focus groups: a spatial relation or a count comparison
OPERATORS: tuple[str, ...] = (*DIRECTIONS, *COMPARISONS)


def operator_of(question: str) -> str | None:
    """The relation ("left of", "above", ...) or comparison ("more", "fewer", "as many") a question
    applies, or None (attribute, count, caption, ... questions)."""
    for rel in DIRECTIONS:
        if f" {rel} the " in question:
            return rel
    for name in COMPARISONS:
        if question.startswith(f"are there {name} "):
            return name
    return None


def _answer_domain(scene: Scene, answer: str) -> list[str]:
    """Plausible answers of the same family as ``answer`` (the pool wrong proposals come from)."""
    for domain in (COLOURS, SHAPES, SIZES, POSITIONS):
        if answer in domain:
            return list(domain)
    if answer.isdigit():
        value = int(answer)  # near misses are the plausible wrong counts
        return [str(v) for v in range(max(0, value - 2), min(MAX_COUNT, value + 2) + 1)]
    return list(dict.fromkeys([o.describe() for o in scene.objects] + [NOTHING]))


#: families whose short answers make sense as a proposal to verify
VERIFIABLE: tuple[Callable[[Scene, random.Random], QA | None], ...] = (
    attribute_question, count_question, position_question, _neighbour_question,
)


@FAMILIES.register("verify")
def verify_question(scene: Scene, rng: random.Random) -> QA | None:
    """Propose an answer to a short question and ask whether it is right; yes/no ~50/50."""
    families = list(VERIFIABLE)
    rng.shuffle(families)
    base = next((qa for qa in (family(scene, rng) for family in families) if qa is not None), None)
    if base is None:
        return None
    truth = base.answers[0]
    wrong = [a for a in _answer_domain(scene, truth) if a != truth]
    if wrong and rng.random() < 0.5:
        proposal, answer = rng.choice(wrong), NO
    else:
        proposal, answer = truth, YES
    return QA(verification_question(base.question, proposal), [answer], "verify", base.focus)


def _position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption_text(scene: Scene) -> str:
    """Objects in reading order: "a small red circle at the top left, a large blue square in the center and ...".

    Args:
        scene: the scene to describe.
    """
    parts = [f"{article(o.describe(with_size=True))} {_position_phrase(o.position)}" for o in scene.objects]
    if len(parts) <= 1:
        return "".join(parts) or "nothing"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_json(scene: Scene) -> str:
    """``json.dumps`` of the objects in reading order, keys shape, color, size, position.

    Args:
        scene: the scene to describe.
    """
    return json.dumps([{"shape": o.shape, "color": o.colour, "size": o.size, "position": o.position}
                       for o in scene.objects])


@FAMILIES.register("caption")
def caption_question(scene: Scene, rng: random.Random) -> QA:
    """"describe the image." -> :func:`caption_text`."""
    return QA(CAPTION_QUESTION, [caption_text(scene)], "caption", (tuple(o.cell for o in scene.objects),))


@FAMILIES.register("caption_json")
def caption_json_question(scene: Scene, rng: random.Random) -> QA:
    """"describe the image in json." -> :func:`caption_json`."""
    return QA(CAPTION_JSON_QUESTION, [caption_json(scene)], "caption_json", (tuple(o.cell for o in scene.objects),))


QUESTION_TYPES: tuple[str, ...] = (
    "attribute", "existence", "count", "position", "relation", "comparison", "verify", "caption", "caption_json",
)
assert tuple(sorted(QUESTION_TYPES)) == tuple(FAMILIES.names()), "QUESTION_TYPES and FAMILIES disagree"


def ask(scene: Scene, rng: random.Random, qtype: str) -> QA | None:
    """One question of family ``qtype`` about ``scene``, or None when the scene offers none.

    Args:
        scene: the scene asked about.
        rng: random source.
        qtype: a name in :data:`QUESTION_TYPES`; unknown names raise a ValueError listing them.
    """
    return FAMILIES.get(qtype)(scene, rng)


def questions_for(scene: Scene, rng: random.Random, types: Sequence[str] = QUESTION_TYPES,
                  per_type: int = 1) -> list[QA]:
    """Up to ``per_type`` questions of each family in ``types``, without repeated question texts.

    Args:
        scene: the scene asked about.
        rng: random source.
        types: families to ask, in output order.
        per_type: questions tried per family (fewer come back when a family has no or duplicate questions).
    """
    out: list[QA] = []
    seen: set[str] = set()
    for qtype in types:
        for _ in range(per_type):
            qa = ask(scene, rng, qtype)
            if qa is not None and qa.question not in seen:
                seen.add(qa.question)
                out.append(qa)
    return out


def world_texts(n: int, *, seed: int | str = 0, split: str = "train", types: Sequence[str] = QUESTION_TYPES,
                answers: bool = True) -> list[str]:
    """At least ``n`` questions (and answers) of the ``types`` families about random scenes
    (tokenizer training; with ``answers=False`` the spoken-question LM).

    Args:
        n: minimum number of texts.
        seed: seeds the scene and question stream.
        split: scenes come from this split.
        types: question families asked of every scene.
        answers: also list each question's first answer, after it.
    """

    rng = random.Random(f"world-texts-{seed}")
    texts: list[str] = []
    while len(texts) < n:
        scene = sample_scene(rng, split)
        for qtype in types:
            qa = ask(scene, rng, qtype)
            if qa is not None:
                texts += [qa.question, qa.answers[0]] if answers else [qa.question]
    return texts
