"""Visual-token redundancy study (issue #24): pruning and layer skipping on hybrid (AR then diffusion)
and from-scratch (diffusion-only) models, on short and long answers, with and without the exact
prefix cache. Prints one markdown table per model and workload.

The seed study of visual-token redundancy in dMLLMs reports that redundancy emerges only in
from-scratch models and on long answers, that pruning loses information only from-scratch models
recover in late denoising steps, and that layer skipping suits AR-to-diffusion models while
progressive or late-step pruning suits from-scratch ones. docs/redundancy.md says how these tables
decide each finding.

Settings (all through ``model.generate``, i.e. the one sampler, one token per step unless
``--long-steps`` says otherwise), each run once without a cache and once with the exact prefix
cache (``prefix``: the prompt, visual tokens included, is encoded once, unpruned; pruning then only
leaves the pruned cached image keys out of the canvas queries' attention, and layer skipping skips
the canvas' layers):

* ``unpruned``: the reference row of its cache mode;
* FastV (K=2: ranked by the attention the response pays at layer 1) and DivPrune (K=0: the most
  diverse subset of the image embeddings) keeping each ``--ratios`` share of the image tokens,
  at four times: ``step 0`` (every step), ``late`` (from the middle step on), ``progressive``
  (the kept share decays linearly from 1 at step 0 to the ratio at the last step) and ``early``
  (the first half of the steps only; the image tokens come back for the late steps: whether late
  denoising recovers what early pruning lost);
* VTW (every image token withdrawn after layer K, ``--vtw-layers``) from step 0, late and early;
* layer skipping (``--skip``: the layers skipped) from step 0 (static) and late (step-wise).

Columns: accuracy (normalised exact match; JSON captions right when every object is right) with its
95% **Wilson score** interval; the accuracy change vs the unpruned row of the same cache mode in
points; ``changed``: the share of answers whose text differs from that row's (a paired measure:
\\|change\\| <= changed, so a row with <= 1% changed answers loses <= 1 point whatever the interval
says); for JSON captions ``fields right``, the share of the true objects' fields answered right
(graded, where accuracy counts a caption only when every field is right); decoder GFLOP per answer (``mmdiff.flops``; with the cache, pruned cached keys are gathered
out of the key tensor, so only the later attention is saved) and the FLOPs cut vs that row; NFE per answer; median
end-to-end latency per answer at batch 1 (image encoding included). ``target`` marks the rows that
cut >= 25% of the decoder FLOPs at <= 1 point accuracy loss (point estimates).

    python bench/redundancy.py [--models hybrid=checkpoints/mmdiff-tiny-rich
        from-scratch=checkpoints/mmdiff-tiny-rich-diffusion-only] [--n 300] [--n-long 30]
        [--ratios 0.75,0.5,0.25] [--long-length 152] [--long-steps N] [--repeats 1] [--json OUT.json]
    python bench/redundancy.py --smoke --models shipped=checkpoints/mmdiff-tiny
    python bench/redundancy.py --tables OUT.json   # the tables of a saved run, e.g. for docs
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

import common
from common import Example, Result, Setting, measure

DEFAULT_MODELS = ("hybrid=checkpoints/mmdiff-tiny-rich",
                  "from-scratch=checkpoints/mmdiff-tiny-rich-diffusion-only")
CACHES = ("none", "prefix")  # without and with the exact prefix cache
FLOPS_CUT_TARGET = 0.25  # the target: >= 25% fewer decoder FLOPs ...
LOSS_TARGET_POINTS = 1.0  # ... at <= 1 point accuracy loss
COLUMNS = ("cache", "method", "setting", "accuracy (95% CI)", "Δ points", "changed", "fields right", "GFLOP / answer",
           "FLOPs cut", "NFE", "latency ms", "target")
SMOKE = {"n": 5, "n_long": 2, "ratios": "0.5", "long_steps": 19, "repeats": 1}


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def study_settings(steps: int, n_layers: int, *, ratios: tuple[float, ...], vtw_layers: tuple[int, ...],
                   skip: tuple[int, ...], split: int | None = None) -> list[Setting]:
    """The study's settings for ``steps`` denoising steps on a decoder of ``n_layers`` layers (no
    cache; :func:`study` runs each once per cache mode). ``family`` is the method column.

    Args:
        steps: denoising steps of the workload.
        split: the step late rows start from and early rows stop at (default ``steps // 2``).
        n_layers: decoder depth (FastV's K is 2, or 1 on decoders of two layers or fewer).
        ratios: kept shares of the image tokens for FastV and DivPrune.
        vtw_layers: the K of each VTW row (image tokens withdrawn before layer K).
        skip: the decoder layers the skipping rows leave out.
    """
    from mmdiff.sampling.pruning import PruningConfig

    mid = steps // 2 if split is None else split
    if not 0 < mid < steps:
        raise ValueError(f"the early/late split step must be inside the {steps} steps, got {mid}")
    sampler = {"steps": steps}
    times = (("step 0", {}), (f"late (from step {mid})", {"prune_from_step": mid}),
             ("progressive", {"prune_schedule": "progressive"}), (f"early (until step {mid})", {"prune_until_step": mid}))
    out = [Setting("unpruned", "baseline", sampler)]
    for family, label, k in (("FastV", "fastv", 2 if n_layers > 2 else 1), ("DivPrune", "divprune", 0)):
        out += [Setting(f"keep {r:.0%} K={k}, {when}", family, sampler,
                        pruning=PruningConfig(prune=label, keep_ratio=r, prune_layer=k, **extra))
                for r in ratios for when, extra in times]
    out += [Setting(f"K={k}, {when}", "VTW", sampler, pruning=PruningConfig(prune="vtw", prune_layer=k, **extra))
            for k in vtw_layers for when, extra in times if "prune_schedule" not in extra]  # VTW keeps none
    if skip:
        names = ",".join(map(str, skip))
        out += [Setting(f"layers {names}, {when}", "layer skip", sampler,
                        pruning=PruningConfig(skip_layers=skip, skip_from_step=start))
                for when, start in (("step 0", 0), (f"late (from step {mid})", mid))]
    return out


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (Wilson 1927; 95% at z = 1.96): unlike
    the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def fields_right(texts: list[str], examples: list[Example]) -> float | None:
    """The share of the true JSON captions' fields (shape, color, size, position of every object) the
    answers get right (:func:`mmdiff.evaluation.metrics.score_json_caption`), pooled over the
    examples; None for short answers. A graded measure beside the all-or-nothing accuracy: a caption
    with one field wrong is wrong, so on 30 captions the accuracy moves in steps of 3.3 points."""
    from mmdiff.evaluation.metrics import score_json_caption

    right = total = 0
    for text, ex in zip(texts, examples):
        try:
            truth = json.loads(ex.answers[0])
        except ValueError:
            return None
        if not isinstance(truth, list):
            return None
        score = score_json_caption(text, ex.answers[0])
        right, total = right + score.fields_right, total + score.fields_total
    return right / total if total else None


def row_of(r: Result, base: Result, examples: list[Example] | None = None) -> dict:
    """One table row's numbers: ``r`` against the unpruned ``base`` of the same cache mode (``examples``:
    the workload's, for the JSON captions' ``fields_right``)."""
    n = len(r.correct)
    lo, hi = wilson(sum(r.correct), n)
    delta = 100 * (sum(r.correct) - sum(base.correct)) / n  # exactly -1.0 for 3 of 300 lost
    cut = 1 - r.gflop / base.gflop if base.gflop else 0.0
    s = r.setting
    return {"cache": s.cache, "method": s.family, "setting": s.name,
            "pruning": None if s.pruning is None else s.pruning.to_dict(), "n": n, "accuracy": r.accuracy,
            "ci95": [lo, hi], "delta_points": delta,
            "changed": sum(a != b for a, b in zip(r.texts, base.texts)) / max(1, n),
            "fields_right": None if examples is None else fields_right(r.texts, examples),
            "gflop": r.gflop, "flops_cut": cut, "nfe": r.nfe, "nfe_per_token": r.nfe_per_token,
            "latency_ms": 1000 * r.latency_s,
            "target": cut >= FLOPS_CUT_TARGET and delta >= -LOSS_TARGET_POINTS}


def study(model, examples: list[Example], *, length: int, settings: list[Setting], repeats: int,
          caches: tuple[str, ...] = CACHES) -> list[dict]:
    """Every setting in every cache mode on ``examples`` (canvas ``length``): one row dict each
    (:func:`row_of`), against the first setting (the unpruned one) of its cache mode.

    Args:
        model: a loaded mmdiff model (``mmdiff.load``).
        examples: the workload's questions.
        length: the answer canvas in tokens.
        settings: :func:`study_settings`, the unpruned setting first.
        repeats: timed runs of every example.
        caches: the cache modes (``prefix`` needs a model that runs with the ``prefix`` mask).
    """
    rows = []
    for cache in caches:
        results = []
        for s in settings:
            s = replace(s, cache=cache)
            print(f"  [{cache}] {s.family} {s.name} ...", file=sys.stderr, flush=True)
            results.append(measure(model, s, examples, length, repeats))
        rows += [row_of(r, results[0], examples) for r in results]
    return rows


def format_workload(entry: dict, workload: str, *, threads: int) -> str:
    """A heading line and the table of one model's workload in a report (see ``--json``)."""
    w = entry["workloads"][workload]
    return (f"\n### {entry['name']} ({entry['dir']}), {workload} answers: {w['n']} examples, canvas {w['canvas']}, "
            f"{w['steps']} steps, {w['visual_tokens']} visual of {w['prompt_tokens']} prompt tokens, "
            f"torch threads {threads}\n\n{format_table(w['rows'])}")


def format_table(rows: list[dict]) -> str:
    """One markdown table of :func:`study`'s rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lo, hi = r["ci95"]
        cells = (r["cache"], r["method"], r["setting"], f"{r['accuracy']:.1%} ({lo:.1%}-{hi:.1%})",
                 f"{r['delta_points']:+.1f}", f"{r['changed']:.1%}",
                 "-" if r.get("fields_right") is None else f"{r['fields_right']:.1%}", f"{r['gflop']:.3f}",
                 f"{r['flops_cut']:.1%}",
                 f"{r['nfe']:.1f}", f"{r['latency_ms']:.1f}", "**yes**" if r["target"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# when the answer is decided
# ------------------------------------------------------------------------------------------------
def decode_order(model, examples: list[Example], *, length: int, steps: int, split: int) -> dict:
    """When the unpruned sampler (no cache) commits each answer's content: the step (0-based) of the
    first and last token that is not EOS / padding, per answer. Early-step pruning can only change an
    answer whose content is decided before the split step; this says how many are.

    Returns:
        ``{"n", "steps", "split", "first": {step: count}, "last": {step: count}, "after_split": share}``,
        ``after_split`` being the share of answers whose whole content is committed at or after ``split``.
    """
    from mmdiff.sampling import DecodeConfig, SamplerConfig

    filler = {model.special.eos, model.special.pad}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    after = 0
    decode = DecodeConfig(sampler=SamplerConfig(gen_length=length, steps=steps))
    for ex in examples:
        r = model.generate([ex.question], images=[ex.image], decode=decode)[0]
        # fixed_at counts forwards (1 at the first step; -1 = preset), one per step without a cache
        content = [at - 1 for tok, at in zip(r.tokens, r.fixed_at) if tok not in filler and at > 0]
        if not content:
            continue
        first[min(content)] = first.get(min(content), 0) + 1
        last[max(content)] = last.get(max(content), 0) + 1
        after += min(content) >= split
    return {"n": len(examples), "steps": steps, "split": split, "first": dict(sorted(first.items())),
            "last": dict(sorted(last.items())), "after_split": after / max(1, len(examples))}


def format_order(name: str, workload: str, o: dict) -> str:
    """One markdown row of :func:`decode_order` (see :data:`ORDER_COLUMNS`)."""
    def counts(d: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items())

    return (f"| {name} | {workload} | {o['n']} | {o['steps']} | {counts(o['first'])} | {counts(o['last'])} | "
            f"{o['split']} | {o['after_split']:.1%} |")


ORDER_COLUMNS = ("model", "workload", "answers", "steps", "first content token fixed at step: answers",
                 "last content token fixed at step: answers", "split step", "all content at or after it")


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def parse_models(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` items as (name, dir) pairs; a bad item is one ValueError line."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models takes NAME=DIR items, got {item!r}")
        if name in dict(out):
            raise ValueError(f"--models names {name!r} twice")
        out.append((name, path))
    return out


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def prompt_tokens(model, ex: Example) -> tuple[int, int]:
    """(visual tokens, prompt tokens) of one example's prompt."""
    from mmdiff.model import IMAGE

    with torch.no_grad():
        _, valid, kinds = model.prepare([ex.question], images=[ex.image])
    return int((kinds == IMAGE).sum()), int(valid.sum())


def workload_lengths(args) -> dict[str, tuple[int, int]]:
    """(canvas, denoising steps) of each workload under the command line's settings."""
    return {"short": (args.gen_length, args.gen_length),
            "long": (args.long_length, args.long_steps or args.long_length)}


def build_parser():
    p = common.parser(__doc__, threads=1)
    p.set_defaults(model=None)  # --models names the models
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME=DIR",
                   help="the models compared (default: " + " ".join(DEFAULT_MODELS) + ")")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    p.add_argument("--n", type=int, default=300, help="short-answer examples (default: 300)")
    p.add_argument("--n-long", type=int, default=30, help="long-answer (JSON caption) examples (default: 30)")
    p.add_argument("--gen-length", type=int, default=8, help="short-answer canvas (default: 8)")
    p.add_argument("--long-length", type=int, default=152, help="long-answer canvas (default: 152)")
    p.add_argument("--long-steps", type=int, help="denoising steps of long answers (default: --long-length)")
    p.add_argument("--workloads", default="short,long", help="comma-separated: short, long (default: both)")
    p.add_argument("--ratios", default="0.75,0.5,0.25", help="kept shares of FastV / DivPrune (default: 0.75,0.5,0.25)")
    p.add_argument("--vtw-layers", help="K of the VTW rows (default: half the depth and the last layer)")
    p.add_argument("--skip", help="layers the skipping rows leave out (default: the middle layer and the next; "
                                  "'none' for no skipping rows)")
    p.add_argument("--split-step", type=int,
                   help="the step late rows start from and early rows stop at (default: half the workload's steps)")
    p.add_argument("--caches", default=",".join(CACHES), help="comma-separated cache modes (default: none,prefix)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of every example (default: 1)")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--tables", metavar="REPORT.json", help="print the tables of a saved --json report and stop")
    p.add_argument("--decode-order", action="store_true",
                   help="only say when the unpruned sampler commits each answer's content (no pruning rows)")
    p.add_argument("--smoke", action="store_true",
                   help="a short check: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    return p


def run_model(p, args, name: str, path: str, data: dict[str, list[Example]], *, workloads: list[str],
              ratios: tuple[float, ...], caches: tuple[str, ...], threads: int) -> dict:
    """One model's report entry: every workload's rows, each table printed as soon as it is measured."""
    torch.manual_seed(0)
    model = common.load_model(args, path)
    n_layers = model.cfg.decoder.n_layers
    vtw = int_list(args.vtw_layers) if args.vtw_layers else tuple(sorted({n_layers // 2, n_layers - 1}))
    skip = (() if args.skip == "none" else int_list(args.skip) if args.skip
            else tuple(sorted({min(n_layers - 1, n_layers // 2 + i) for i in (0, 1)})))
    bad = [k for k in (*vtw, *skip) if not 0 <= k < n_layers]
    if bad:
        p.error(f"--models {name}: layer {bad[0]} of --vtw-layers / --skip is out of range for its "
                f"{n_layers} decoder layers")
    if "prefix" in caches and model.exact_cache != "prefix":
        p.error(f"--models {name}: the prefix cache is exact only for models trained with the prefix mask; "
                f"this one runs {model.cfg.decoder.attn_mode} attention (use --caches none)")
    lengths = workload_lengths(args)
    entry = {"name": name, "dir": path, "n_layers": n_layers, "workloads": {}}
    for w in workloads:
        (L, steps), examples = lengths[w], data[w]
        print(f"[{name}] {w} ...", file=sys.stderr, flush=True)
        settings = study_settings(steps, n_layers, ratios=ratios, vtw_layers=vtw, skip=skip, split=args.split_step)
        rows = study(model, examples, length=L, settings=settings, repeats=args.repeats, caches=caches)
        visual, prompt = prompt_tokens(model, examples[0])
        entry["workloads"][w] = {"n": len(examples), "canvas": L, "steps": steps, "visual_tokens": visual,
                                 "prompt_tokens": prompt, "rows": rows}
        print(format_workload(entry, w, threads=threads), flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.tables:
        report = json.loads(Path(args.tables).read_text())
        for entry in report["models"]:
            for w in entry["workloads"]:
                print(format_workload(entry, w, threads=report["threads"]))
        return 0
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    try:
        models = parse_models(args.models)
        ratios = tuple(float(v) for v in args.ratios.split(",") if v.strip())
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        caches = tuple(c.strip() for c in args.caches.split(",") if c.strip())
        if not ratios or not all(0 <= r < 1 for r in ratios):
            raise ValueError(f"--ratios takes kept shares in [0, 1), got {args.ratios!r}")
        bad = [w for w in workloads if w not in ("short", "long")] + [c for c in caches if c not in CACHES]
        if bad:
            raise ValueError(f"unknown workload or cache {bad[0]!r}; workloads: short, long; caches: none, prefix")
        for w in workloads:
            steps = workload_lengths(args)[w][1]
            if args.split_step is not None and not 0 < args.split_step < steps:
                raise ValueError(f"--split-step {args.split_step} must be inside the {steps} steps of the {w} workload")
    except ValueError as e:
        p.error(str(e))
    if args.model is not None:
        p.error("this bench compares models: name them with --models NAME=DIR")
    for name, path in models:
        if not (Path(path) / "config.json").is_file():
            p.error(f"--models {name}: no model at {path} (train it first: its recipe is in configs/)")
    common.start(p, args)
    data = common.test_split(args.n, args.n_long, args.data_seed)
    empty = [w for w in workloads if not data[w]]
    if empty:
        p.error(f"no examples for the {empty[0]} workload")
    if args.decode_order:
        lengths = workload_lengths(args)
        print("| " + " | ".join(ORDER_COLUMNS) + " |\n|" + "---|" * len(ORDER_COLUMNS))
        for name, path in models:
            torch.manual_seed(0)
            model = common.load_model(args, path)
            for w in workloads:
                (L, steps) = lengths[w]
                split = args.split_step or steps // 2
                print(format_order(name, w, decode_order(model, data[w], length=L, steps=steps, split=split)),
                      flush=True)
        return 0
    report: dict = {"argv": sys.argv[1:] if argv is None else list(argv), "threads": torch.get_num_threads(),
                    "repeats": args.repeats, "models": []}
    for name, path in models:
        report["models"].append(run_model(p, args, name, path, data, workloads=workloads, ratios=ratios,
                                          caches=caches, threads=report["threads"]))
        if args.json:  # after every model, so a long run leaves its numbers behind
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
