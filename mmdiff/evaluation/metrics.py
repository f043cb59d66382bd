"""VQA answer normalisation, exact match, VQAv2 soft accuracy, the summary of an evaluation run, word
error rate, and scene-caption scores (field accuracy, JSON parse rate, all objects right).

The normalisation is the one of the VQAv2 evaluation script as run by EvalAI (Antol et al. 2015;
Goyal et al. 2017, "Making the V in VQA Matter"): lower-case, drop commas and question marks,
separate "'s", strip or space out punctuation, drop sentence periods (not decimal points), map
number words to digits, drop the articles a / an / the, and restore apostrophes of common
contractions ("isnt" -> "isn't"). Both the prediction and every reference answer are normalised.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from statistics import mean, median
from typing import Any

#: number words -> digits (VQAv2 ``manualMap``)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
#: characters removed (next to a space, or anywhere in text with a digit-comma-digit) or else
#: replaced by a space (VQAv2 ``punct``)
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
#: a period not followed by a digit. ``(?!<=\d)`` is the reference script's (inert) look-ahead,
#: kept so that the behaviour is byte-for-byte that of the standard evaluation.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")
#: spelling without apostrophe -> with (VQAv2 ``contractions``; applied per word after lower-casing,
#: so the capitalised keys of the reference table never match and are left out)
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    """VQAv2 ``processPunctuation``: punctuation next to a space (or in text holding a number with a
    thousands comma) is deleted, elsewhere it becomes a space; sentence periods are deleted."""
    out = text
    glued = COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    return PERIOD_STRIP.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """VQAv2 ``processDigitArticle``: number words -> digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation (EvalAI's VQAv2 answer processor).

    Examples: ``"Two"`` -> ``"2"``, ``"the dog."`` -> ``"dog"``, ``"isnt"`` -> ``"isn't"``,
    ``"Yes!"`` -> ``"yes"``, ``"3.5"`` -> ``"3.5"``.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


#: the VQAv2 rule needs this many annotators: an answer given by 3 of them is fully right
VQA_ANNOTATORS_FOR_SOFT = 3


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy, min(#annotators who gave the prediction / 3, 1), where a row has the
    annotators it assumes; exact match otherwise.

    With the standard 10 answers it is averaged over the 10 subsets of 9 answers (leave one
    annotator out), as in the official evaluation; with 3 to 9 or more than 10 answers it is
    min(matches / 3, 1) over all of them. With 1 or 2 reference answers (a generated dataset's
    canonical answer and its variants) there are no annotators to count: it is :func:`exact_match`,
    so a right answer scores 1, not 1/3.

    Args:
        prediction: the model's answer.
        answers: the reference answers, one per annotator (repeats count).
    """
    if len(answers) < VQA_ANNOTATORS_FOR_SOFT:
        return exact_match(prediction, answers)
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) != 10:
        return min(sum(hits) / 3, 1.0)
    subsets = list(combinations(hits, 9))
    return sum(min(sum(s) / 3, 1.0) for s in subsets) / len(subsets)


def stats(values: Iterable[float]) -> dict[str, float | None]:
    """Mean, median and 90th percentile (nearest rank) of ``values``; None when empty."""
    xs = sorted(values)
    if not xs:
        return {"mean": None, "median": None, "p90": None}
    return {"mean": mean(xs), "median": median(xs), "p90": xs[max(0, math.ceil(0.9 * len(xs)) - 1)]}


def summarize(predictions: Sequence[Mapping[str, Any]], *, errors: int) -> dict[str, Any]:
    """Aggregate per-row prediction records into the run's metrics.

    Args:
        predictions: records with ``exact_match``, ``vqa_accuracy``, ``type``, ``nfe``, ``latency_s``.
        errors: number of rows reported in errors.jsonl.

    Returns:
        ``n``, ``errors``, ``accuracy``, ``vqa_accuracy``, ``by_type`` ({type: {n, accuracy,
        vqa_accuracy}}), ``nfe`` and ``latency_s`` ({mean, median, p90}). Accuracies are None
        when no row was evaluated.
    """
    def avg(key: str, rows: Sequence[Mapping[str, Any]]) -> float | None:
        return sum(r[key] for r in rows) / len(rows) if rows else None

    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for p in predictions:
        by_type.setdefault(p["type"], []).append(p)
    return {
        "n": len(predictions),
        "errors": errors,
        "accuracy": avg("exact_match", predictions),
        "vqa_accuracy": avg("vqa_accuracy", predictions),
        "by_type": {t: {"n": len(rows), "accuracy": avg("exact_match", rows), "vqa_accuracy": avg("vqa_accuracy", rows)}
                    for t, rows in sorted(by_type.items())},
        "nfe": stats(p["nfe"] for p in predictions),
        "latency_s": stats(p["latency_s"] for p in predictions),
    }


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate: the word-level Levenshtein distances (substitutions, insertions, deletions)
    of every hypothesis to its reference, summed, over the total number of reference words.

    Args:
        refs: reference transcripts (split on whitespace; no other normalisation).
        hyps: the hypotheses, one per reference.
    """
    errors = words = 0
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors += d[len(h)]
        words += len(r)
    return errors / max(1, words)


# ------------------------------------------------------------------------------------------------
# scene captions: "describe the image." (caption_text) and "describe the image in json." (caption_json)
# ------------------------------------------------------------------------------------------------
#: the fields of one captioned object (the keys of :func:`mmdiff.data.questions.caption_json`'s items)
CAPTION_FIELDS = ("size", "color", "shape", "position")
_PHRASE_SEP = re.compile(r", | and ")
_OBJECT = re.compile(r"an? (\w+) (\w+) (\w+) (?:at|in) the (.+)")  # caption_text's "a small red circle at the top left"

CaptionObject = dict[str, Any]  # CAPTION_FIELDS -> value (None: the field is missing)


def _json_objects(value: Any) -> list[CaptionObject | None]:
    """The objects of a parsed JSON caption, one per list item (None: the item is not an object);
    a value that is not a list holds none."""
    if not isinstance(value, list):
        return []
    return [{f: item.get(f) for f in CAPTION_FIELDS} if isinstance(item, dict) else None for item in value]


def _caption_objects(text: str) -> list[CaptionObject | None]:
    """The objects of a caption in ``caption_text``'s or ``caption_json``'s form (JSON when it starts
    with "["): one per phrase or JSON item, None when unreadable (a JSON caption that does not parse
    is one unreadable object)."""
    if text.lstrip().startswith("["):
        try:
            return _json_objects(json.loads(text))
        except json.JSONDecodeError:
            return [None]
    out: list[CaptionObject | None] = []
    for phrase in _PHRASE_SEP.split(text.strip().rstrip(".")):
        m = _OBJECT.fullmatch(phrase.strip())
        out.append(dict(zip(CAPTION_FIELDS, m.groups())) if m else None)
    return out


def _field_counts(predicted: Sequence[CaptionObject | None], true: Sequence[CaptionObject]) -> tuple[int, int]:
    """(fields right, fields counted) with objects matched by position: every true object counts its
    fields; every predicted object that is unreadable, has no string position, has no true object
    at its position, or repeats a position adds as many wrong fields."""
    by_position = {t["position"]: t for t in true if isinstance(t["position"], str)}
    seen: set[str] = set()
    right = extra = 0
    for obj in predicted:
        position = None if obj is None else obj["position"]
        if not isinstance(position, str) or position not in by_position or position in seen:
            extra += 1
            continue
        seen.add(position)
        right += sum(obj[f] == by_position[position][f] for f in CAPTION_FIELDS)
    return right, len(CAPTION_FIELDS) * (len(true) + extra)


def caption_field_accuracy(prediction: str, truth: str) -> float:
    """Field accuracy of a text or JSON scene caption.

    Objects are matched by position and each true object has 4 fields (size, colour, shape,
    position); every predicted phrase or item without a true object at its position, unreadable, or
    repeating a position adds 4 wrong fields; a JSON caption that does not parse is one unreadable
    object. Text captions are read in :func:`mmdiff.data.questions.caption_text`'s form ("a small
    red circle at the top left, ... and ..."), JSON ones (starting with "[") in
    :func:`~mmdiff.data.questions.caption_json`'s.

    Args:
        prediction: the model's caption.
        truth: the true caption, in the same form.

    Returns:
        fields right / fields counted.
    """
    true = [o for o in _caption_objects(truth) if o is not None]
    right, total = _field_counts(_caption_objects(prediction), true)
    return right / total


@dataclass(frozen=True)
class JsonCaptionScore:
    """One JSON scene caption scored against the true one (see :func:`score_json_caption`)."""

    parsed: bool  # ``json.loads`` succeeds
    value: Any  # the parsed prediction (None when it does not parse)
    all_right: bool  # the parsed prediction equals the true caption: every object right, none extra
    fields_right: int  # fields of true objects the prediction gets right (objects matched by position)
    fields_total: int  # fields counted: 4 per true object and 4 per extra predicted item


def score_json_caption(prediction: str, truth: str) -> JsonCaptionScore:
    """Score a JSON caption ("describe the image in json.") against the true one.

    Field counts match objects by position as :func:`caption_field_accuracy` does, except that a
    prediction that does not parse, or is not a list, holds no objects (it shows in ``parsed``).

    Args:
        prediction: the model's answer.
        truth: the true caption (:func:`mmdiff.data.questions.caption_json`).
    """
    true = json.loads(truth)
    try:
        value, parsed = json.loads(prediction), True
    except ValueError:
        value, parsed = None, False
    right, total = _field_counts(_json_objects(value), [o for o in _json_objects(true) if o is not None])
    return JsonCaptionScore(parsed=parsed, value=value, all_right=parsed and value == true, fields_right=right,
                            fields_total=total)
