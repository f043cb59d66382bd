"""Test-time search: accuracy against NFE for greedy decoding, best-of-N and the hierarchical search.

Every method answers the same held-out questions of the types where the model errs most (by
default counting, spatial relations and long captions; ``--n`` per type, generated in memory from
``mmdiff.data.iter_examples("test", data_seed)``), all in one run, and one table is printed:

* ``greedy``: plain decoding with the sampler flags (``SearchConfig(strategy="none")``),
* ``best-of-N``: N full trajectories, each scored by the verifier (the linear baseline),
* ``hierarchical``: N trajectories pruned by successive halving at the checkpoints, then ``--refine``
  rounds of refinement of the best survivor (dMLLM-TTS),

for N in ``--budgets``. Columns: mean NFE per question (decoder forwards of single sequences, see
``mmdiff.search``), accuracy per type and its mean over types, mean latency. Short answers are
scored by VQA exact match; captions by the F1 of their object phrases ("a small red circle at the
top left", matched exactly) against the true caption. Two target lines follow: the cheapest
hierarchical row reaching the accuracy of the best best-of-N row, with its NFE ratio (target
<= 1/3), and the hierarchical search against greedy on the hardest type (lowest greedy accuracy).

    python bench/search.py [--model checkpoints/mmdiff-tiny] [--n 40] [--budgets 2 4 8 16]
                           [--verifier elbo|yesno] [search flags] [sampler flags]
"""
from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass, field, replace

from mmdiff import DEFAULT_MODEL_DIR
from mmdiff.commands.options import add_sampler_arguments, sampler_config_from_args
from mmdiff.search import add_search_arguments, search_config_from_args

CAPTION_TYPES = ("caption",)
_PHRASE_SEP = re.compile(r", | and ")


@dataclass
class Cell:
    """Totals of one method on one question type."""

    n: int = 0
    score: float = 0.0
    nfe: int = 0
    latency_s: float = 0.0


@dataclass
class Row:
    """One method: its label, search settings and per-type totals."""

    method: str
    candidates: int
    refine: int
    cells: dict[str, Cell] = field(default_factory=dict)

    def accuracy(self, qtype: str) -> float:
        c = self.cells.get(qtype, Cell())
        return c.score / max(c.n, 1)

    def mean_accuracy(self) -> float:
        return sum(self.accuracy(t) for t in self.cells) / max(len(self.cells), 1)

    def mean(self, attr: str) -> float:
        n = sum(c.n for c in self.cells.values())
        return sum(getattr(c, attr) for c in self.cells.values()) / max(n, 1)


def caption_f1(prediction: str, truth: str) -> float:
    """F1 between the object phrases of two captions (split at ", " and " and ", matched exactly)."""
    pred = {p.strip().rstrip(".") for p in _PHRASE_SEP.split(prediction) if p.strip()}
    gold = {p.strip() for p in _PHRASE_SEP.split(truth) if p.strip()}
    hits = len(pred & gold)
    return 0.0 if hits == 0 else 2 * hits / (len(pred) + len(gold))


def score_answer(prediction: str, answers: list[str], qtype: str) -> float:
    """Caption F1 for caption types, VQA exact match otherwise."""
    from mmdiff.evaluation.metrics import exact_match

    return caption_f1(prediction, answers[0]) if qtype in CAPTION_TYPES else exact_match(prediction, answers)


def questions(types: list[str], n: int, seed: int) -> list[tuple[object, object]]:
    """``n`` (image, QA) pairs per type from the held-out test stream, one question per scene."""
    from mmdiff.data import iter_examples

    out = []
    for qtype in types:
        stream = ((image, qas[0]) for _, image, qas in iter_examples("test", seed, types=(qtype,)) if qas)
        out += list(itertools.islice(stream, n))
    return out


def format_table(rows: list[Row], types: list[str]) -> str:
    """One markdown table, a row per method."""
    head = "| method | N | T | NFE | " + " | ".join(types) + " | mean acc | latency ms |"
    lines = [head, "|" + "---|" * (6 + len(types))]
    for r in rows:
        accs = " | ".join(f"{r.accuracy(t):.1%}" for t in types)
        lines.append(f"| {r.method} | {r.candidates} | {r.refine} | {r.mean('nfe'):.1f} | {accs} | "
                     f"{r.mean_accuracy():.1%} | {1000 * r.mean('latency_s'):.0f} |")
    return "\n".join(lines)


def targets(rows: list[Row], types: list[str]) -> list[str]:
    """The two target lines: NFE ratio at best-of-N's accuracy, and the hardest type against greedy."""
    greedy = next(r for r in rows if r.method == "greedy")
    bon = [r for r in rows if r.method == "best-of-N"]
    hier = [r for r in rows if r.method == "hierarchical"]
    lines = []
    if bon and hier:
        ref = max(bon, key=lambda r: (r.mean_accuracy(), -r.mean("nfe")))
        reach = [r for r in hier if r.mean_accuracy() >= ref.mean_accuracy()]
        if reach:
            best = min(reach, key=lambda r: r.mean("nfe"))
            ratio = best.mean("nfe") / ref.mean("nfe")
            lines.append(f"target 1: best-of-{ref.candidates} mean acc {ref.mean_accuracy():.1%} at NFE "
                         f"{ref.mean('nfe'):.1f}; hierarchical N={best.candidates} reaches it at NFE "
                         f"{best.mean('nfe'):.1f} = {ratio:.2f}x "
                         f"({'met' if ratio <= 1 / 3 else 'not met'}, target <= 0.33x)")
        else:
            lines.append(f"target 1: no hierarchical row reaches best-of-{ref.candidates}'s mean acc "
                         f"{ref.mean_accuracy():.1%} (not met)")
    if hier:
        hardest = min(types, key=greedy.accuracy)
        top = max(hier, key=lambda r: r.accuracy(hardest))
        met = top.accuracy(hardest) > greedy.accuracy(hardest)
        lines.append(f"target 2: hardest type {hardest!r}: greedy {greedy.accuracy(hardest):.1%}, hierarchical "
                     f"N={top.candidates} {top.accuracy(hardest):.1%} ({'met' if met else 'not met'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"model directory (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--n", type=int, default=40, help="questions per type (default: 40)")
    p.add_argument("--types", nargs="+", default=["count", "relation", "caption"],
                   help="question types (default: count relation caption)")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="N values of best-of-N and hierarchical (default: 2 4 8 16)")
    p.add_argument("--caption-length", type=int, default=64, help="canvas of caption types (default: 64)")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto = cuda when available)")
    add_search_arguments(p)
    add_sampler_arguments(p, gen_length=8)
    args = p.parse_args(argv)

    import torch

    from mmdiff.data.questions import QUESTION_TYPES
    from mmdiff.model import MultimodalDiffusionLM
    from mmdiff.search import search

    for t in args.types:
        if t not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {t!r}; known: {', '.join(QUESTION_TYPES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = MultimodalDiffusionLM.from_pretrained(args.model, device=device)
    short = sampler_config_from_args(args)
    scale = args.caption_length / short.gen_length
    long = replace(short, gen_length=args.caption_length,
                   steps=None if short.steps is None else max(1, round(short.steps * scale)),
                   block_length=None if short.block_length is None else max(1, round(short.block_length * scale)))
    base = search_config_from_args(args)
    methods = [("greedy", replace(base, strategy="none", candidates=1, refine=0))]
    methods += [("best-of-N", replace(base, strategy="best_of_n", candidates=n, refine=0)) for n in args.budgets]
    methods += [("hierarchical", replace(base, strategy="hierarchical", candidates=n)) for n in args.budgets]
    rows = [Row(name, s.candidates, s.refine) for name, s in methods]
    for image, qa in questions(args.types, args.n, args.data_seed):
        config = long if qa.type in CAPTION_TYPES else short
        for row, (_, s) in zip(rows, methods):
            res = search(model, qa.question, image=image, config=config, search=s, cache=args.cache)
            cell = row.cells.setdefault(qa.type, Cell())
            cell.n, cell.nfe, cell.latency_s = cell.n + 1, cell.nfe + res.nfe, cell.latency_s + res.latency_s
            cell.score += score_answer(res.text, qa.answers, qa.type)
    n_q = sum(c.n for c in rows[0].cells.values())
    print(f"test-time search, {n_q} test questions ({args.n} per type, data seed {args.data_seed}), "
          f"model {args.model}, device {device}, verifier {base.verifier}, keep {base.keep}, "
          f"checkpoints {list(base.checkpoints)}, refine {base.refine}, search temperature {base.temperature}, "
          f"caption canvas {args.caption_length}")
    print(format_table(rows, args.types))
    for line in targets(rows, args.types):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
