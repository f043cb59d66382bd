"""What every bench script shares: its parser's common flags and their effect, and the measuring core
of the decoding benches (``fast_inference.py``, ``redundancy.py``): test-split examples, a
:class:`Setting` (one way of answering) and :func:`measure` (accuracy, NFE, decoder FLOPs, latency).

Bench scripts run as ``python bench/<name>.py`` (this folder is then on ``sys.path``) and import
this module as ``common``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mmdiff.commands.options import add_model_arguments


def parser(doc: str, *, threads: int = 0, seed: bool = False) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` with ``--model``, ``--device``, ``--dtype``
    (:func:`mmdiff.commands.options.add_model_arguments`: any directory ``mmdiff.load`` reads) and
    ``--threads`` (and ``--seed``).

    Args:
        doc: the script's module docstring.
        threads: default torch CPU threads (0: torch's choice).
        seed: add ``--seed`` (default 0), the generation seed of the script's test data.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads, 0 = torch's choice (default: {threads})")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="test data seed (default: 0)")
    return p


def start(p: argparse.ArgumentParser, args: argparse.Namespace, *, speech: bool = False) -> None:
    """Apply the common flags; with ``speech``, stop with the parser's error when no synthesiser exists."""
    if speech:
        from mmdiff.data.speech import NO_SYNTHESISER, espeak_available

        if not espeak_available():
            p.error(NO_SYNTHESISER)
    if args.threads:
        torch.set_num_threads(args.threads)


def load_model(args: argparse.Namespace, path: str | None = None):
    """``mmdiff.load`` of ``path`` (default ``--model``) with the parser's ``--device`` and ``--dtype``."""
    from mmdiff import load

    return load(path or args.model, dtype=args.dtype, device=args.device)


def matmul_peak(*, repeats: int = 5, n: int = 2048) -> float:
    """The machine's fp32 matmul peak in GFLOP/s with torch's current thread count: the fastest of
    ``repeats`` (n, n) x (n, n) products (2n^3 FLOPs each), after one warm-up product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------------------
# examples and settings of the decoding benches
# ------------------------------------------------------------------------------------------------
LONG_TYPES = ("caption_json",)
SKIP_TYPES = ("caption", "caption_json", "asr")  # not short VQA questions


@dataclass
class Example:
    image: Any  # PIL image or path
    question: str
    answers: list[str]


@dataclass
class Setting:
    """One way of answering: sampler overrides, cache, pruning; ``family`` groups settings (the
    candidates of fast_inference's best combination, redundancy's method column; ``""`` = none)."""

    name: str
    family: str = ""
    sampler: dict = field(default_factory=dict)
    cache: str = "none"
    pruning: Any = None  # PruningConfig | None
    ar: bool = False


@dataclass
class Result:
    setting: Setting
    accuracy: float
    nfe: float  # per answer
    nfe_per_token: float
    gflop: float  # per answer
    latency_s: float  # median per answer
    correct: list[bool] = field(default_factory=list)  # per example
    texts: list[str] = field(default_factory=list)  # per example, the answer as decoded


def test_split(n_short: int, n_long: int, seed: int) -> dict[str, list[Example]]:
    """Short and long examples from the in-memory test split: one short question per scene (the
    families in turn) and one JSON caption per scene."""
    from mmdiff.data import iter_examples

    short: list[Example] = []
    long: list[Example] = []
    for i, (_, image, qas) in enumerate(iter_examples("test", seed)):
        if len(short) >= n_short and len(long) >= n_long:
            break
        shorts = [qa for qa in qas if qa.type not in SKIP_TYPES]
        if shorts and len(short) < n_short:
            qa = shorts[i % len(shorts)]
            short.append(Example(image, qa.question, list(qa.answers)))
        for qa in qas:
            if qa.type in LONG_TYPES and len(long) < n_long:
                long.append(Example(image, qa.question, list(qa.answers)))
    return {"short": short, "long": long}


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def is_correct(prediction: str, answers: list[str]) -> bool:
    """Normalised exact match; JSON answers are compared as parsed JSON."""
    from mmdiff.evaluation.metrics import exact_match, score_json_caption

    try:
        truth = [json.loads(a) for a in answers]
    except ValueError:
        return exact_match(prediction, answers) == 1.0
    if all(isinstance(t, (list, dict)) for t in truth):
        return any(score_json_caption(prediction, a).all_right for a in answers)
    return exact_match(prediction, answers) == 1.0


def answer_tokens(tokens: list[int], eos: int) -> int:
    """Tokens of the answer: up to and including the first EOS (the whole canvas without one)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def ar_answer(model, ex: Example, max_new_tokens: int, counter) -> tuple[str, list[int], int]:
    """The AR baseline on one example: encode, embed, KV-cached greedy decoding (FLOPs counted)."""
    from mmdiff.sampling.autoregressive import ar_generate

    with torch.no_grad():
        image = model.image_tokens([ex.image])[0]
        embeds, valid = model.embed_prompt([model.format_prompt(ex.question, n_images=1)], images=[[image]])
        with counter.watch(model.decoder):
            out = ar_generate(model.decoder, embeds, valid, max_new_tokens=max_new_tokens, eos_id=model.special.eos,
                              pad_id=model.special.pad)
    tokens = out.tokens[0].tolist()
    return model.decode(tokens), tokens, out.nfe


def measure(model, setting: Setting, examples: list[Example], L: int, repeats: int) -> Result:
    """Run ``setting`` on every example ``repeats`` times (after one untimed warm-up answer).

    Accuracy, NFE and FLOPs are those of each example's first run; latency is the median over all runs.
    """
    from mmdiff.flops import FlopCounter
    from mmdiff.sampling import DecodeConfig, PruningConfig, SamplerConfig

    decode = DecodeConfig(sampler=SamplerConfig(**{"gen_length": L, **setting.sampler}), cache=setting.cache,
                          pruning=setting.pruning or PruningConfig())

    def once(ex: Example) -> tuple[str, list[int], int, int]:
        counter = FlopCounter(model.cfg.decoder)
        if setting.ar:
            text, tokens, nfe = ar_answer(model, ex, L, counter)
        else:
            res = model.generate([ex.question], images=[ex.image], decode=decode, counter=counter)[0]
            text, tokens, nfe = res.text, res.tokens, res.nfe
        return text, tokens, nfe, counter.flops

    once(examples[0])
    nfe, per_token, flops, times = 0.0, 0.0, 0.0, []
    correct, texts = [], []
    for ex in examples:
        for r in range(repeats):
            t0 = time.perf_counter()
            text, tokens, n, f = once(ex)
            times.append(time.perf_counter() - t0)
            if r == 0:
                correct.append(is_correct(text, ex.answers))
                texts.append(text)
                nfe += n
                per_token += n / answer_tokens(tokens, model.special.eos)
                flops += f
    k = len(examples)
    return Result(setting, sum(correct) / k, nfe / k, per_token / k, flops / k / 1e9, statistics.median(times),
                  correct, texts)
