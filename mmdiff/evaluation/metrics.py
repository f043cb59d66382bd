"""VQA answer normalisation, exact match, VQAv2 soft accuracy and the summary of an evaluation run.

The normalisation is the one of the VQAv2 evaluation script as run by EvalAI (Antol et al. 2015;
Goyal et al. 2017, "Making the V in VQA Matter"): lower-case, drop commas and question marks,
separate "'s", strip or space out punctuation, drop sentence periods (not decimal points), map
number words to digits, drop the articles a / an / the, and restore apostrophes of common
contractions ("isnt" -> "isn't"). Both the prediction and every reference answer are normalised.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
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


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy: min(#annotators who gave the prediction / 3, 1).

    With the standard 10 answers it is averaged over the 10 subsets of 9 answers (leave one
    annotator out), as in the official evaluation; with another number of answers it is
    min(matches / 3, 1) over all of them.

    Args:
        prediction: the model's answer.
        answers: the reference answers, one per annotator (repeats count).
    """
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
