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
scored by VQA exact match; captions by field accuracy (objects "a small red circle at the top
left" matched by position, 4 fields each; extra or unreadable phrases count as 4 wrong fields).
"oracle acc" scores the best of the finished candidates a method scored (what a perfect verifier
would reach; the chosen answer for greedy).
Target lines follow: for each best-of-N row that beats greedy, the cheapest hierarchical row
reaching its accuracy and the NFE ratio (target <= 1/3); and the hierarchical search against
greedy on the hardest type (lowest greedy accuracy).

    python bench/search.py [--model checkpoints/mmdiff-tiny] [--n 40] [--budgets 2 4 8 16]
                           [--verifier elbo|yesno] [search flags] [sampler flags]
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import common
from mmdiff.commands.options import add_decode_arguments, decode_config_from_args
from mmdiff.tasks.presets import SHORT_ANSWER

CAPTION_TYPES = ("caption", "caption_json")

DEFAULTS = SHORT_ANSWER


@dataclass
class Cell:
    """Totals of one method on one question type."""

    n: int = 0
    score: float = 0.0
    coverage: float = 0.0  # best score among the finished candidates (an oracle verifier's accuracy)
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

    def mean_coverage(self) -> float:
        return sum(c.coverage / max(c.n, 1) for c in self.cells.values()) / max(len(self.cells), 1)

    def mean(self, attr: str) -> float:
        n = sum(c.n for c in self.cells.values())
        return sum(getattr(c, attr) for c in self.cells.values()) / max(n, 1)


def score_answer(prediction: str, answers: list[str], qtype: str) -> float:
    """Caption field accuracy for caption types, VQA exact match otherwise."""
    from mmdiff.evaluation.metrics import caption_field_accuracy, exact_match

    return caption_field_accuracy(prediction, answers[0]) if qtype in CAPTION_TYPES else exact_match(prediction, answers)


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
    head = "| method | N | T | NFE | " + " | ".join(types) + " | mean acc | oracle acc | latency ms |"
    lines = [head, "|" + "---|" * (7 + len(types))]
    for r in rows:
        accs = " | ".join(f"{r.accuracy(t):.1%}" for t in types)
        lines.append(f"| {r.method} | {r.candidates} | {r.refine} | {r.mean('nfe'):.1f} | {accs} | "
                     f"{r.mean_accuracy():.1%} | {r.mean_coverage():.1%} | {1000 * r.mean('latency_s'):.0f} |")
    return "\n".join(lines)


def comparisons(rows: list[Row], types: list[str]) -> list[str]:
    """Measurements read off the table: per best-of-N row, the cheapest hierarchical row whose mean
    accuracy reaches it and the NFE ratio; on the hardest type (lowest greedy accuracy), greedy
    against the best hierarchical row."""
    greedy = next(r for r in rows if r.method == "greedy")
    hier = [r for r in rows if r.method == "hierarchical"]
    lines = []
    for ref in (r for r in rows if r.method == "best-of-N"):
        head = f"best-of-{ref.candidates}: mean acc {ref.mean_accuracy():.1%} at NFE {ref.mean('nfe'):.1f}"
        reach = [r for r in hier if r.mean_accuracy() >= ref.mean_accuracy()]
        if not reach:
            lines.append(f"{head}; no hierarchical row reaches that accuracy (greedy: {greedy.mean_accuracy():.1%})")
            continue
        best = min(reach, key=lambda r: r.mean("nfe"))
        lines.append(f"{head}; cheapest hierarchical row reaching it: N={best.candidates} at NFE "
                     f"{best.mean('nfe'):.1f} = {best.mean('nfe') / ref.mean('nfe'):.2f}x its NFE")
    if hier:
        hardest = min(types, key=greedy.accuracy)
        top = max(hier, key=lambda r: r.accuracy(hardest))
        lines.append(f"hardest type {hardest!r}: greedy {greedy.accuracy(hardest):.1%}, best hierarchical "
                     f"N={top.candidates} {top.accuracy(hardest):.1%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--n", type=int, default=40, help="questions per type (default: 40)")
    p.add_argument("--types", nargs="+", default=["count", "relation", "caption"],
                   help="question types (default: count relation caption)")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="N values of best-of-N and hierarchical (default: 2 4 8 16)")
    p.add_argument("--caption-length", type=int, default=64, help="canvas of caption types (default: 64)")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    add_decode_arguments(p, DEFAULTS)
    args = p.parse_args(argv)
    common.start(p, args)

    from mmdiff.data.questions import QUESTION_TYPES
    from mmdiff.search import search

    for t in args.types:
        if t not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {t!r}; known: {', '.join(QUESTION_TYPES)}")
    model = common.load_model(args)
    decode = decode_config_from_args(args, DEFAULTS)
    short = decode.sampler
    scale = args.caption_length / short.gen_length
    long = replace(short, gen_length=args.caption_length,
                   steps=None if short.steps is None else max(1, round(short.steps * scale)),
                   block_length=None if short.block_length is None else max(1, round(short.block_length * scale)))
    base = decode.search
    methods = [("greedy", replace(base, strategy="none", candidates=1, refine=0))]
    methods += [("best-of-N", replace(base, strategy="best_of_n", candidates=n, refine=0)) for n in args.budgets]
    methods += [("hierarchical", replace(base, strategy="hierarchical", candidates=n)) for n in args.budgets]
    rows = [Row(name, s.candidates, s.refine) for name, s in methods]
    for image, qa in questions(args.types, args.n, args.data_seed):
        config = long if qa.type in CAPTION_TYPES else short
        for row, (_, s) in zip(rows, methods):
            res = search(model, qa.question, image=image, decode=decode.replace(sampler=config, search=s))
            cell = row.cells.setdefault(qa.type, Cell())
            cell.n, cell.nfe, cell.latency_s = cell.n + 1, cell.nfe + res.nfe, cell.latency_s + res.latency_s
            cell.score += score_answer(res.text, qa.answers, qa.type)
            cell.coverage += max(score_answer(text, qa.answers, qa.type) for text, _ in res.candidates)
    n_q = sum(c.n for c in rows[0].cells.values())
    print(f"test-time search, {n_q} test questions ({args.n} per type, data seed {args.data_seed}), "
          f"model {args.model}, device {model.device}, verifier {base.verifier}, keep {base.keep}, "
          f"checkpoints {list(base.checkpoints)}, refine {base.refine}, search temperature {base.temperature}, "
          f"caption canvas {args.caption_length}")
    print(format_table(rows, args.types))
    for line in comparisons(rows, args.types):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
