"""Fast inference side by side: caches, confident decoding, visual-token pruning, layer skipping,
their best combination and the autoregressive baseline, on held-out test scenes. Prints one table.

Two workloads: ``short`` (VQA questions, ``--gen-length`` canvas, default 8) and ``long`` (JSON
scene captions, "describe the image in json.", ``--long-length`` canvas, default 64). Examples come
from the test split generated in memory (``iter_examples("test", seed)``) or from ``--data FILE.jsonl``
(caption_json rows are the long workload, every other question row the short one).

Settings per workload (all through ``model.generate``, i.e. the one sampler):

* ``vanilla``: one token per step, no cache (the reference of "speedup vs vanilla"),
* ``confident t``: Dimple's confident decoding at thresholds 0.9, 0.7, 0.5,
* ``prefix cache`` (exact for the prefix-LM), ``blocks of B`` (semi-AR, no cache) and Fast-dLLM's
  ``block cache`` / ``dual cache`` over those blocks,
* ``FastV keep r K=2`` (r = 50%, 25%; also from the middle step on, and progressive),
  ``DivPrune keep 25% K=0``, ``VTW K``,
* ``skip layers a,b from step S``,
* ``best combination``: per family (decoding, cache, pruning, skipping) the fastest setting whose
  accuracy is within ``--tolerance`` of vanilla, combined and measured like the others,
* ``AR baseline``: KV-cached greedy decoding of the phase-1 checkpoint (``--ar-model``).

Columns: accuracy (normalised exact match; JSON answers compared as parsed JSON), NFE per answer
token (answer = canvas up to and including the first EOS), decoder FLOPs per answer
(``mmdiff.flops``), median end-to-end latency per answer over ``--repeats`` runs of every example
(batch 1, image encoding included), achieved GFLOP/s (FLOPs / latency), and speedups (latency ratios)
vs vanilla and vs the AR baseline. Two more rows give the machine's limit: the peak GFLOP/s of a
large fp32 matmul and the GFLOP/s of one bare decoder forward of the vanilla shape.

    python bench/fast_inference.py [--model checkpoints/mmdiff-tiny] [--ar-model checkpoints/mmdiff-tiny-ar]
        [--n 60] [--n-long 12] [--repeats 3] [--threads 1] [--data FILE.jsonl]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import common
from common import LONG_TYPES, Example, Result, Setting, measure

DEFAULT_AR_MODEL = "checkpoints/mmdiff-tiny-ar"


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def jsonl_split(path: str, n_short: int, n_long: int) -> dict[str, list[Example]]:
    """Short and long examples from a dataset file (rows without a text question are skipped)."""
    from mmdiff.data.dataset import Row, read_rows

    out: dict[str, list[Example]] = {"short": [], "long": []}
    for row in read_rows(path):
        if not isinstance(row, Row) or row.question is None or row.type in ("caption", "asr"):
            continue
        kind, cap = ("long", n_long) if row.type in LONG_TYPES else ("short", n_short)
        if len(out[kind]) < cap:
            out[kind].append(Example(str(row.image), row.question, list(row.answers)))
    return out


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def settings_for(L: int, n_layers: int) -> list[Setting]:
    """The settings of one workload with canvas length ``L`` on a decoder of ``n_layers`` layers."""
    from mmdiff.sampling.pruning import PruningConfig

    block = max(1, L // 8 if L >= 32 else L // 2)
    mid = L // 2
    vtw_k = max(1, n_layers // 2)
    skip = tuple(sorted({min(n_layers - 1, vtw_k), min(n_layers - 1, vtw_k + 1)}))
    out = [Setting("vanilla", sampler=dict(steps=L))]
    out += [Setting(f"confident {t}", "decoding", dict(transfer="threshold", threshold=t)) for t in (0.9, 0.7, 0.5)]
    out += [Setting("prefix cache", "cache", dict(steps=L), cache="prefix"),
            Setting(f"blocks of {block}, no cache", "", dict(steps=L, block_length=block)),
            Setting(f"block cache, blocks of {block}", "cache", dict(steps=L, block_length=block), cache="block"),
            Setting(f"dual cache, blocks of {block}", "cache", dict(steps=L, block_length=block), cache="dual")]
    fastv = dict(prune="fastv", prune_layer=2 if n_layers > 2 else 1)
    out += [Setting("FastV keep 50% K=2", "pruning", dict(steps=L), pruning=PruningConfig(keep_ratio=0.5, **fastv)),
            Setting("FastV keep 25% K=2", "pruning", dict(steps=L), pruning=PruningConfig(keep_ratio=0.25, **fastv)),
            Setting(f"FastV keep 25% K=2 from step {mid}", "pruning", dict(steps=L),
                    pruning=PruningConfig(keep_ratio=0.25, prune_from_step=mid, **fastv)),
            Setting("FastV keep 25% K=2 progressive", "pruning", dict(steps=L),
                    pruning=PruningConfig(keep_ratio=0.25, prune_schedule="progressive", **fastv)),
            Setting("DivPrune keep 25% K=0", "pruning", dict(steps=L),
                    pruning=PruningConfig(prune="divprune", keep_ratio=0.25, prune_layer=0)),
            Setting(f"VTW K={vtw_k}", "pruning", dict(steps=L), pruning=PruningConfig(prune="vtw", prune_layer=vtw_k))]
    out += [Setting(f"skip layers {','.join(map(str, skip))} from step {mid}", "skipping", dict(steps=L),
                    pruning=PruningConfig(skip_layers=skip, skip_from_step=mid))]
    return out


def combine(results: list[Result], vanilla: Result, tolerance: float) -> Setting | None:
    """Per family, the fastest setting within ``tolerance`` of vanilla's accuracy, merged into one."""
    from mmdiff.sampling.pruning import PruningConfig

    best: dict[str, Result] = {}
    for r in results:
        fam = r.setting.family
        if not fam or r.accuracy < vanilla.accuracy - tolerance:
            continue
        if fam not in best or r.latency_s < best[fam].latency_s:
            best[fam] = r
    if not best:
        return None
    sampler: dict = {}
    cache, pruning = "none", PruningConfig()
    for fam in ("cache", "decoding"):  # decoding last: its transfer rule wins, the cache keeps its blocks
        if fam in best:
            sampler.update(best[fam].setting.sampler)
            cache = best[fam].setting.cache if fam == "cache" else cache
    if "decoding" in best:
        sampler.pop("steps", None)
    for fam, keys in (("pruning", ("prune", "keep_ratio", "prune_layer", "prune_from_step", "prune_until_step",
                                    "prune_schedule")),
                      ("skipping", ("skip_layers", "skip_from_step"))):
        if fam in best:
            try:
                pruning = replace(pruning, **{k: getattr(best[fam].setting.pruning, k) for k in keys})
            except ValueError:  # e.g. FastV would score a skipped layer: keep the pruning alone
                del best[fam]
    parts = " + ".join(best[f].setting.name for f in ("decoding", "cache", "pruning", "skipping") if f in best)
    return Setting(f"best combination: {parts}", "", sampler, cache, pruning)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def machine_limit(model, example: Example, L: int, repeats: int) -> tuple[float, float, float]:
    """(peak fp32 matmul GFLOP/s, decoder-forward GFLOP/s, decoder-forward seconds) on this machine."""
    from mmdiff.flops import forward_flops

    peak = common.matmul_peak(repeats=max(3, repeats))
    with torch.no_grad():
        image = model.image_tokens([example.image])[0]
        embeds, valid = model.embed_prompt([model.format_prompt(example.question, n_images=1)], images=[[image]])
        x = torch.cat([embeds, model.decoder.embed(torch.full((1, L), model.special.mask))], dim=1)
        out = model.decoder(inputs_embeds=x)
        t = statistics.median(_timed(lambda: model.decoder(inputs_embeds=x)) for _ in range(max(5, 3 * repeats)))
    return peak, forward_flops(model.cfg.decoder, out) / t / 1e9, t


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def format_table(rows: list[tuple[str, Result]], ar: dict[str, Result], machine: tuple[float, float, float],
                 threads: int) -> str:
    """One markdown table: a row per (workload, setting), then the machine rows."""
    head = ("| workload | setting | accuracy | NFE / answer token | NFE | GFLOP / answer | median latency ms | "
            "GFLOP/s | speedup vs vanilla | speedup vs AR |")
    lines = [head, "|" + "---|" * 10]
    vanilla = {w: r for w, r in rows if r.setting.name == "vanilla"}
    for w, r in rows:
        vs_ar = f"{ar[w].latency_s / r.latency_s:.2f}x" if w in ar else "-"
        lines.append(f"| {w} | {r.setting.name} | {r.accuracy:.1%} | {r.nfe_per_token:.2f} | {r.nfe:.1f} | "
                     f"{r.gflop:.3f} | {1000 * r.latency_s:.1f} | {r.gflop / r.latency_s:.1f} | "
                     f"{vanilla[w].latency_s / r.latency_s:.2f}x | {vs_ar} |")
    peak, achieved, t = machine
    lines.append(f"| machine | fp32 matmul 2048x2048, {threads} thread(s) (peak) | - | - | - | - | - | "
                 f"{peak:.1f} | - | - |")
    lines.append(f"| machine | one decoder forward, vanilla shape ({achieved / peak:.0%} of peak) | - | - | - | - | "
                 f"{1000 * t:.2f} | {achieved:.1f} | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, threads=1)
    p.add_argument("--ar-model", default=DEFAULT_AR_MODEL,
                   help=f"phase-1 AR checkpoint for the baseline; 'none' to leave it out (default: {DEFAULT_AR_MODEL})")
    p.add_argument("--data", help="JSONL dataset instead of the in-memory test split")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    p.add_argument("--n", type=int, default=60, help="short-answer examples (default: 60)")
    p.add_argument("--n-long", type=int, default=12, help="long-answer (JSON caption) examples (default: 12)")
    p.add_argument("--gen-length", type=int, default=8, help="short-answer canvas (default: 8)")
    p.add_argument("--long-length", type=int, default=64, help="long-answer canvas (default: 64)")
    p.add_argument("--workloads", default="short,long", help="comma-separated: short, long (default: both)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every example (default: 3)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="best combination: accuracy drop allowed per family vs vanilla (default: 0.02)")
    args = p.parse_args(argv)

    common.start(p, args)
    torch.manual_seed(0)
    model = common.load_model(args)
    ar_model = None if args.ar_model == "none" else common.load_model(args, args.ar_model)
    data = (jsonl_split(args.data, args.n, args.n_long) if args.data
            else common.test_split(args.n, args.n_long, args.data_seed))
    lengths = {"short": args.gen_length, "long": args.long_length}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in lengths:
            raise ValueError(f"unknown workload {w!r}; known: short, long")
        if not data[w]:
            raise ValueError(f"no examples for the {w} workload")
    rows: list[tuple[str, Result]] = []
    ar: dict[str, Result] = {}
    n_layers = model.cfg.decoder.n_layers
    for w in workloads:
        L, examples = lengths[w], data[w]
        results = []
        for s in settings_for(L, n_layers):
            print(f"[{w}] {s.name} ...", file=sys.stderr, flush=True)
            results.append(measure(model, s, examples, L, args.repeats))
        vanilla = results[0]
        best = combine(results, vanilla, args.tolerance)
        if best is not None:
            print(f"[{w}] {best.name} ...", file=sys.stderr, flush=True)
            results.append(measure(model, best, examples, L, args.repeats))
        if ar_model is not None:
            print(f"[{w}] AR baseline ...", file=sys.stderr, flush=True)
            ar[w] = measure(ar_model, Setting(f"AR baseline ({Path(args.ar_model).name})", ar=True), examples, L,
                            args.repeats)
            results.append(ar[w])
        rows += [(w, r) for r in results]
    machine = machine_limit(model, data[workloads[0]][0], lengths[workloads[0]], args.repeats)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"examples " + ", ".join(f"{w} {len(data[w])}" for w in workloads))
    print(format_table(rows, ar, machine, torch.get_num_threads()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
