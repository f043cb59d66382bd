"""mmdiff's sampler against the reference samplers, token for token.

``tests/data/reference_samplers.json`` holds what LLaDA's ``generate.py`` and Fast-dLLM's ``generate``,
``generate_with_prefix_cache`` and ``generate_with_dual_cache`` produced on the llada-tiny fixture for
eight prompts (greedy; low-confidence remasking on the schedule, threshold 0.9, and a low threshold
that fixes several tokens a step), recorded by running the released code outside this repository
(``tests/data/README.md``). Here mmdiff's one loop runs the same decoding, as the matching
:class:`~mmdiff.sampling.DecodeConfig` says (cache ``none`` / ``block`` / ``dual``), with all eight
prompts in one batch and one prompt at a time, and must give the same tokens (and, one prompt at a
time, the same number of forward passes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mmdiff.checkpoints import load_checkpoint
from mmdiff.sampling import DecodeConfig, SamplerConfig, sample
from mmdiff.sampling.denoisers import build_denoiser

DATA = Path(__file__).resolve().parent / "data" / "reference_samplers.json"
RECORD = json.loads(DATA.read_text())
#: the reference function -> mmdiff's cache of the same decoding
CACHE_OF = {"generate": "none", "generate_with_prefix_cache": "block", "generate_with_dual_cache": "dual"}
#: where the llada-tiny fixture may be: the repository's copy, or the shared one beside the checkout
FIXTURE_DIRS = (Path(__file__).resolve().parent / "fixtures" / "llada-tiny",
                Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llada-tiny")


def run_id(run: dict) -> str:
    threshold = run["args"].get("threshold")
    return (f"{run['repo'].split('/')[1]}.{run['function']}-steps{run['args']['steps']}"
            f"{'' if threshold is None else f'-threshold{threshold}'}-batch{run['batch']}")


@pytest.fixture(scope="module")
def decoder():
    directory = next((d for d in FIXTURE_DIRS if d.is_dir()), None)
    if directory is None:
        pytest.skip(f"llada-tiny fixture not found in {[str(d) for d in FIXTURE_DIRS]}")
    for name, sha in RECORD["weights_sha256"].items():  # the very weights the references ran on
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha, f"{directory / name} changed"
    return load_checkpoint(directory, dtype=torch.float32)


def decode_config(args: dict, function: str) -> DecodeConfig:
    """The DecodeConfig of a reference call's arguments."""
    threshold = args.get("threshold")
    rule = {} if threshold is None else {"transfer": "threshold", "threshold": threshold}
    return DecodeConfig(cache=CACHE_OF[function], sampler=SamplerConfig(
        gen_length=args["gen_length"], steps=args["steps"], block_length=args["block_length"],
        remasking=args["remasking"], temperature=args["temperature"], **rule))


def mmdiff_sample(decoder, prompts: torch.Tensor, decode: DecodeConfig) -> tuple[list[list[int]], int]:
    valid = torch.ones_like(prompts, dtype=torch.bool)  # (B, P): equal-length prompts, no padding
    denoiser = build_denoiser(decode.cache, decoder, decoder.embed(prompts), valid, attn_mode="bidirectional",
                              planner=None, counter=None)
    out = sample(denoiser, batch_size=prompts.shape[0], config=decode.sampler, mask_id=RECORD["mask_id"])
    return out.tokens.tolist(), out.nfe


def test_the_record_covers_every_reference_sampler() -> None:
    covered = {(r["repo"], r["function"], r["args"].get("threshold"), r["batch"]) for r in RECORD["runs"]}
    assert {("ML-GSAI/LLaDA", "generate", None, 1), ("ML-GSAI/LLaDA", "generate", None, 8)} <= covered
    for function in CACHE_OF:
        for threshold in (None, 0.9):
            assert ("NVlabs/Fast-dLLM", function, threshold, 1) in covered
    assert all(len(r["tokens"]) == len(RECORD["prompts"]) == 8 for r in RECORD["runs"])


@pytest.mark.parametrize("batch", [8, 1])
@pytest.mark.parametrize("run", RECORD["runs"], ids=run_id)
def test_tokens_equal_the_reference_run(decoder, run: dict, batch: int) -> None:
    prompts = torch.tensor(RECORD["prompts"])  # (8, P)
    decode = decode_config(run["args"], run["function"])
    if batch == len(prompts):
        assert mmdiff_sample(decoder, prompts, decode)[0] == run["tokens"]
        return
    rows = [mmdiff_sample(decoder, prompts[i:i + 1], decode) for i in range(len(prompts))]
    assert [tokens[0] for tokens, _ in rows] == run["tokens"]
    if run["nfe"] is not None and run["batch"] == 1:  # Fast-dLLM counts its forward passes per call
        assert [nfe for _, nfe in rows] == run["nfe"]
