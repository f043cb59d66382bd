"""Serving under load: the step-batching engine against the per-request loop and the KV-cached AR
baseline at concurrency 1, 4, 16 and 64, on held-out test questions with images. Prints one table,
the machine's matmul peak and a burst line.

Three systems answer the same requests (request i asks test question i mod ``--n`` about its image,
generated in memory from ``iter_examples("test", seed)`` as in ``bench/fast_inference.py``):

* ``engine``: one :class:`~mmdiff.serving.engine.Engine` stepping in its background thread
  (``--max-batch``); ``c`` client threads each keep one request in flight through
  ``engine.submit(...).result(timeout)`` (``submit`` reads the image on the client's thread; the
  engine encodes the images and prompts of the requests it admits together, in batches);
* ``per-request loop``: ``c`` client threads sharing the model, each calling ``model.generate`` on
  one question at a time (what the Gradio demo does today); each thread's ops use torch's intra-op
  pool of ``--threads`` threads, so ``c`` threads oversubscribe the cores;
* ``AR baseline``: the same loop with ``generate_ar`` of ``--ar-model`` (KV-cached greedy decoding,
  at most ``gen_length`` new tokens).

Both diffusion systems decode with the server's defaults (8-token canvas, prefix cache, confident
decoding ``--transfer threshold --threshold 0.9``); every decode flag overrides them, within what
the engine batches. Columns: answers/s over the level's wall time, and as a multiple of the
per-request loop's at the same concurrency; answer tokens/s (tokens up to and including the first
EOS); p50 / p99 latency per request as its client sees it (submit to answer, image encoding
included; nearest rank); NFE per answer; the decoder's achieved GFLOP/s: its FLOPs over every row of
every forward (``mmdiff.flops`` per sequence, times the batch, counted by a forward hook) divided by
the engine's busy time (``stats.busy_s``, the time inside its steps) on engine rows and by the wall
time on the loops' rows, and that as a share of the fp32 matmul peak measured in the same run with
the same thread count (``common.matmul_peak``); on engine rows, how many answers are token for
token the per-request loop's.

Clients are threads, as the demo's and a server's workers are. Each thread that runs torch ops
(``model.generate``, ``submit``'s image encoding, the engine's steps) gets its own OpenMP team of
``--threads`` threads, and libgomp stops spinning between parallel regions once the teams' threads
outnumber the cores, so with ``--threads 2`` on two cores every system here runs its ops slower than
one thread alone would (compare ``--threads 1``).

The burst line: ``--burst`` clients submit at once to an engine whose waiting line holds
``--burst-queue`` requests; a client refused with ``QueueFull`` (the server's HTTP 429) counts it,
backs off (exponential from 5 ms to 200 ms, jittered) and retries; every request has ``--timeout``
seconds from its first try. Dropped = never accepted or failed; hung = accepted, no answer in time.

    python bench/serve.py [--model checkpoints/mmdiff-tiny] [--ar-model checkpoints/mmdiff-tiny-ar]
        [--concurrency 1,4,16,64] [--requests 256] [--n 64] [--max-batch 16] [--burst 200]
        [--burst-queue 8] [--timeout 120] [--threads 2] [--data-seed 0] [decode flags]
"""
from __future__ import annotations

import itertools
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from common import Example, answer_tokens, test_split
from fast_inference import DEFAULT_AR_MODEL

import common
from mmdiff.commands.options import add_decode_arguments, decode_config_from_args
from mmdiff.flops import forward_flops
from mmdiff.sampling import DecodeConfig
from mmdiff.serving.chat import SERVER_DECODE

#: the server's default decoding (issue #23): 8-token canvas, prefix cache, confident decoding
SERVE_DEFAULTS = SERVER_DECODE.replace(cache="prefix")
ENGINE, LOOP, AR = "engine", "per-request loop", "AR baseline"
BACKOFF_S = (0.005, 0.2)  # first and longest wait of a client refused with QueueFull


@dataclass
class Level:
    """One system at one concurrency: per request its answer and latency, and the level's totals."""

    system: str
    concurrency: int
    results: list[Any]  # GenerationResult per request, in request order
    latencies: list[float]  # seconds per request, as its client saw them
    wall_s: float
    flops: float  # decoder FLOPs over every row of every forward
    busy_s: float  # the compute time the GFLOP/s is taken over (engine: stats.busy_s; loops: wall_s)
    stats_flops: float | None = None  # engine: its stats.flops (every row of every forward)
    identical: int | None = None  # engine: answers token for token the per-request loop's


@dataclass
class Burst:
    """What a burst of clients against a short waiting line got."""

    requests: int
    answered: int
    dropped: int
    hung: int
    retries: int  # QueueFull refusals the clients retried
    wall_s: float
    identical: int  # answers token for token the per-request loop's
    compared: int  # answers with a per-request loop answer to compare with


class DecoderWork:
    """The FLOPs of every forward of a model's decoder, over every row of its batch, from any thread
    (:func:`mmdiff.flops.forward_flops` counts one sequence; a batched forward runs B of them)."""

    def __init__(self, model) -> None:
        self.cfg, self.decoder, self.flops = model.cfg.decoder, model.decoder, 0
        self._lock = threading.Lock()

    def _add(self, module, args, out) -> None:
        flops = forward_flops(self.cfg, out) * out.logits.shape[0]
        with self._lock:
            self.flops += flops

    @contextmanager
    def watch(self) -> Iterator[DecoderWork]:
        handle = self.decoder.register_forward_hook(self._add)
        try:
            yield self
        finally:
            handle.remove()


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def drive(ask: Callable[[Example], Any], examples: list[Example], *, requests: int,
          concurrency: int) -> tuple[list[Any], list[float], float]:
    """``concurrency`` client threads each keep one request in flight until ``requests`` are answered;
    request i asks ``examples[i % len(examples)]``. Returns the answers and latencies in request order
    and the wall time."""
    results: list[Any] = [None] * requests
    latencies = [0.0] * requests
    order = itertools.count()

    def client() -> None:
        while (i := next(order)) < requests:
            t0 = time.perf_counter()
            results[i] = ask(examples[i % len(examples)])
            latencies[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="client") as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return results, latencies, time.perf_counter() - t0


def measure(system: str, model, ask: Callable[[Example], Any], examples: list[Example], *, requests: int,
            concurrency: int, engine=None) -> Level:
    """Drive one level, counting the decoder's FLOPs; with ``engine``, stop it at the end (its last
    step has then counted its time) and take the GFLOP/s over its busy time."""
    with DecoderWork(model).watch() as work:
        results, latencies, wall = drive(ask, examples, requests=requests, concurrency=concurrency)
        if engine is not None:
            engine.stop()
    if engine is None:
        return Level(system, concurrency, results, latencies, wall, work.flops, wall)
    return Level(system, concurrency, results, latencies, wall, work.flops, engine.stats.busy_s, engine.stats.flops)


def engine_asker(engine, decode: DecodeConfig, timeout: float) -> Callable[[Example], Any]:
    return lambda ex: engine.submit(ex.question, image=ex.image, decode=decode).result(timeout)


def burst(model, examples: list[Example], decode: DecodeConfig, *, requests: int, max_queue: int, max_batch: int,
          timeout: float, reference: dict[int, list[int]]) -> Burst:
    """``requests`` clients submit at once; each retries ``QueueFull`` with jittered exponential backoff
    until ``timeout`` seconds after its first try (see the module docstring)."""
    from mmdiff.serving.engine import Engine, QueueFull

    engine = Engine(model, max_batch=max_batch, max_queue=max_queue).start()
    retries = itertools.count()
    start = threading.Barrier(requests)

    def client(i: int) -> tuple[str, Any]:
        rng, wait = random.Random(i), BACKOFF_S[0]
        ex = examples[i % len(examples)]
        start.wait()
        deadline = time.monotonic() + timeout
        while True:
            try:
                handle = engine.submit(ex.question, image=ex.image, decode=decode)
                break
            except QueueFull:
                next(retries)
                if time.monotonic() + wait > deadline:
                    return "dropped", None
                time.sleep(wait * rng.uniform(0.5, 1.0))
                wait = min(2 * wait, BACKOFF_S[1])
        try:
            return "answered", handle.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            handle.cancel()
            return "hung", None
        except Exception:  # a failed request is a dropped one
            return "dropped", None

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(requests, thread_name_prefix="burst") as pool:
            outcomes = list(pool.map(client, range(requests)))
    finally:
        engine.stop()
    wall = time.perf_counter() - t0
    kinds = [kind for kind, _ in outcomes]
    compared = [(i, r) for i, (kind, r) in enumerate(outcomes) if kind == "answered" and i % len(examples) in reference]
    identical = sum(r.tokens == reference[i % len(examples)] for i, r in compared)
    return Burst(requests, kinds.count("answered"), kinds.count("dropped"), kinds.count("hung"),
                 next(retries), wall, identical, len(compared))


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(round(q * len(ordered), 9))) - 1]


def format_table(levels: list[Level], *, eos: int, peak: float) -> str:
    """One markdown row per (system, concurrency)."""
    head = ("| system | concurrency | requests | answers/s | x per-request loop | answer tokens/s | p50 ms | "
            "p99 ms | NFE / answer | decoder GFLOP/s | % of peak | identical to per-request loop |")
    lines = [head, "|" + "---|" * 12]
    loop = {lv.concurrency: lv for lv in levels if lv.system == LOOP}
    for lv in levels:
        n = len(lv.results)
        rate = n / lv.wall_s
        ratio = f"{rate / (len(loop[lv.concurrency].results) / loop[lv.concurrency].wall_s):.2f}x" \
            if lv.concurrency in loop else "-"
        tokens = sum(answer_tokens(r.tokens, eos) for r in lv.results) / lv.wall_s
        nfe = sum(r.nfe for r in lv.results) / n
        gflops = lv.flops / lv.busy_s / 1e9
        same = "-" if lv.identical is None else f"{lv.identical}/{n}"
        lines.append(f"| {lv.system} | {lv.concurrency} | {n} | {rate:.1f} | {ratio} | {tokens:.1f} | "
                     f"{1000 * percentile(lv.latencies, 0.5):.1f} | {1000 * percentile(lv.latencies, 0.99):.1f} | "
                     f"{nfe:.2f} | {gflops:.1f} | {gflops / peak:.1%} | {same} |")
    return "\n".join(lines)


def format_burst(b: Burst, *, max_queue: int, max_batch: int, timeout: float) -> str:
    return (f"burst: {b.requests} requests at once, engine max_queue {max_queue}, max_batch {max_batch}, "
            f"timeout {timeout:g} s each: answered {b.answered}, dropped {b.dropped}, hung {b.hung}, "
            f"QueueFull retries {b.retries}, wall {b.wall_s:.2f} s, identical to per-request loop "
            f"{b.identical}/{b.compared}")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _counts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency: positive whole numbers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, threads=2)
    p.add_argument("--ar-model", default=DEFAULT_AR_MODEL,
                   help=f"KV-cached AR baseline checkpoint; 'none' to leave it out (default: {DEFAULT_AR_MODEL})")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    p.add_argument("--concurrency", type=_counts, default=[1, 4, 16, 64],
                   help="client counts, comma-separated (default: 1,4,16,64)")
    p.add_argument("--requests", type=int, default=256, help="requests per system and concurrency (default: 256)")
    p.add_argument("--n", type=int, default=64, help="distinct test questions the requests cycle through (default: 64)")
    p.add_argument("--max-batch", type=int, default=16, help="engine: requests stepped at once (default: 16)")
    p.add_argument("--burst", type=int, default=200, help="burst: clients submitting at once; 0: no burst (default: 200)")
    p.add_argument("--burst-queue", type=int, default=8, help="burst: the engine's waiting line (default: 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default: 120)")
    add_decode_arguments(p, SERVE_DEFAULTS, search=False)
    args = p.parse_args(argv)
    if min(args.requests, args.n, args.max_batch) < 1 or min(args.burst, args.burst_queue) < 0:
        p.error("--requests, --n and --max-batch must be positive, --burst and --burst-queue at least 0")

    from mmdiff.serving.engine import Engine

    common.start(p, args)
    decode = decode_config_from_args(args, SERVE_DEFAULTS)
    model = common.load_model(args)
    try:
        Engine(model).check(decode)
    except ValueError as e:
        p.error(str(e))
    ar_model = None if args.ar_model == "none" else common.load_model(args, args.ar_model)
    examples = test_split(args.n, 0, args.data_seed)["short"]
    L, timeout = decode.sampler.gen_length, args.timeout
    peak = common.matmul_peak()

    def loop_ask(ex: Example):
        return model.generate([ex.question], images=[ex.image], decode=decode)[0]

    def ar_ask(ex: Example):
        return ar_model.generate_ar([ex.question], images=[ex.image], max_new_tokens=L)[0]

    warm = Engine(model).start()
    try:
        engine_asker(warm, decode, timeout)(examples[0])  # first calls pay torch's one-time costs
    finally:
        warm.stop()
    loop_ask(examples[0])
    if ar_model is not None:
        ar_ask(examples[0])
    levels: list[Level] = []
    for c in args.concurrency:
        print(f"concurrency {c}: engine, per-request loop" + (", AR baseline" if ar_model else "") + " ...",
              file=sys.stderr, flush=True)
        engine = Engine(model, max_batch=args.max_batch, max_queue=c).start()
        served = measure(ENGINE, model, engine_asker(engine, decode, timeout), examples, requests=args.requests,
                         concurrency=c, engine=engine)
        loop = measure(LOOP, model, loop_ask, examples, requests=args.requests, concurrency=c)
        served.identical = sum(a.tokens == b.tokens for a, b in zip(served.results, loop.results))
        levels += [served, loop]
        if ar_model is not None:
            levels.append(measure(AR, ar_model, ar_ask, examples, requests=args.requests, concurrency=c))
    levels.sort(key=lambda lv: ((ENGINE, LOOP, AR).index(lv.system), lv.concurrency))
    reference = {i % len(examples): r.tokens for lv in levels if lv.system == LOOP for i, r in enumerate(lv.results)}
    b = None
    if args.burst:
        print(f"burst of {args.burst} ...", file=sys.stderr, flush=True)
        b = burst(model, examples, decode, requests=args.burst, max_queue=args.burst_queue, max_batch=args.max_batch,
                  timeout=timeout, reference=reference)

    threads = torch.get_num_threads()
    s = decode.sampler
    print(f"model {args.model}, AR model {args.ar_model}, torch threads {threads}; decode: {s.gen_length}-token canvas, "
          f"cache {decode.cache}, transfer {s.transfer}" + (f" {s.threshold}" if s.transfer == "threshold" else "") +
          f"; engine max_batch {args.max_batch}; {args.requests} requests per row over {len(examples)} test "
          f"questions (data seed {args.data_seed})")
    print(format_table(levels, eos=model.special.eos, peak=peak))
    print(f"peak: fp32 matmul 2048x2048, {threads} thread(s): {peak:.1f} GFLOP/s")
    engine_levels = [lv for lv in levels if lv.system == ENGINE]
    print("engine stats.flops / stats.busy_s (the engine's own count, every row of every forward): " +
          ", ".join(f"c={lv.concurrency} {lv.stats_flops / lv.busy_s / 1e9:.1f}" for lv in engine_levels) +
          " GFLOP/s")
    if b is not None:
        print(format_burst(b, max_queue=args.burst_queue, max_batch=args.max_batch, timeout=timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
