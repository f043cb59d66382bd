"""Record the reference samplers' tokens on the llada-tiny fixture -> reference_samplers.json.

Run OUTSIDE the mmdiff repository (the reference code is read and run there, never copied in):

    python record_reference_samplers.py --llada LLaDA --fast-dllm Fast-dLLM/llada \\
        --fixture shared/fixtures/llada-tiny --out reference_samplers.json

``--llada``: a checkout of github.com/ML-GSAI/LLaDA (its ``generate.py``); ``--fast-dllm``: the ``llada/``
folder of a checkout of github.com/NVlabs/Fast-dLLM (``generate.py`` and ``model/``, whose
``LLaDAModelLM`` runs every sampler: LLaDA's repository ships no modeling code). How the recorded file
was made (commits, arguments, checks): README.md beside this script. Imports nothing from mmdiff.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

MASK = 500  # llada-tiny's <|mdm_mask|> (fixture README: 126336 -> 500)
SPECIAL_FROM = 448  # ids >= 448 are llada-tiny's special tokens; prompts use ids below
PROMPT_SEED, BATCH, PROMPT_LEN = 20261204, 8, 10
BASE = dict(gen_length=16, block_length=8, temperature=0.0, remasking="low_confidence", mask_id=MASK)
#: steps of the schedule runs: 2 tokens a step; 3 steps a block of 8 (3, 3, 2 tokens: where the remainder goes)
SCHEDULE_STEPS = (8, 6)
#: (steps, threshold) of the Fast-dLLM runs: the schedule runs, threshold 0.9, and a low threshold that
#: fixes several tokens in one step on this near-uniform random model
FAST_DLLM_SETTINGS = tuple((steps, None) for steps in SCHEDULE_STEPS) + ((16, 0.9), (16, 0.0034))
FAST_DLLM_FUNCTIONS = ("generate", "generate_with_prefix_cache", "generate_with_dual_cache")


def commit_of(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference_model(fast_dllm: Path, fixture: Path):
    """Fast-dLLM's LLaDAModelLM with the fixture's weights, checked against its expected.npz."""
    sys.path.insert(0, str(fast_dllm))
    from model import LLaDAConfig, LLaDAModelLM

    cfg = LLaDAConfig(**json.loads((fixture / "config.json").read_text()))
    cfg.use_cache = False  # transformers 5 drops it from the config kwargs; the config.json value
    cfg.init_device = "cpu"  # real tensors instead of "meta"; every one is overwritten below
    model = LLaDAModelLM(cfg)
    state = {}
    for shard in sorted(fixture.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model = model.float().eval()
    expected = np.load(fixture / "expected.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["input_ids"])).logits.numpy()
    rel = float(np.abs(logits - expected["logits"]).max() / np.abs(expected["logits"]).max())
    assert rel < 1e-6, f"reference model does not reproduce expected.npz (rel {rel})"
    return model, rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llada", type=Path, required=True)
    ap.add_argument("--fast-dllm", type=Path, required=True)
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, rel = load_reference_model(args.fast_dllm, args.fixture)
    llada = import_file("llada_generate", args.llada / "generate.py")
    fast = import_file("fast_dllm_generate", args.fast_dllm / "generate.py")
    prompts = torch.randint(0, SPECIAL_FROM, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(PROMPT_SEED))

    def run(fn, kwargs: dict, batch: int) -> tuple[list, list | None]:
        """Generated tokens of every prompt (and Fast-dLLM's nfe), ``batch`` prompts per call."""
        tokens, nfes = [], []
        for start in range(0, BATCH, batch):
            out = fn(model, prompts[start:start + batch], **kwargs)
            x, nfe = out if isinstance(out, tuple) else (out, None)
            tokens += x[:, PROMPT_LEN:].tolist()
            nfes.append(nfe)
        return tokens, None if nfes[0] is None else nfes

    runs = []
    sources = {"llada": ("ML-GSAI/LLaDA", commit_of(args.llada), "generate.py"),
               "fast": ("NVlabs/Fast-dLLM", commit_of(args.fast_dllm), "llada/generate.py")}
    plan = [("llada", "generate", dict(steps=steps, **BASE), batch) for steps in SCHEDULE_STEPS for batch in (1, BATCH)]
    plan += [("fast", name, dict(steps=steps, **BASE, threshold=threshold), 1)
             for name in FAST_DLLM_FUNCTIONS for steps, threshold in FAST_DLLM_SETTINGS]
    for source, name, kwargs, batch in plan:
        repo, commit, path = sources[source]
        module = llada if source == "llada" else fast
        tokens, nfe = run(getattr(module, name), kwargs, batch)
        runs.append({"repo": repo, "commit": commit, "file": path, "function": name, "args": kwargs,
                     "batch": batch, "tokens": tokens, "nfe": nfe})
        print(repo, name, kwargs, "batch", batch, "nfe", nfe)
    weights = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(args.fixture.glob("model-*.safetensors"))}
    record = {"checkpoint": "llada-tiny", "weights_sha256": weights, "reference_logits_rel_error": rel,
              "mask_id": MASK, "prompt_seed": PROMPT_SEED, "prompts": prompts.tolist(), "runs": runs}
    lines = ",\n  ".join(json.dumps(r) for r in runs)  # one run per line
    head = json.dumps({k: v for k, v in record.items() if k != "runs"})[:-1]
    args.out.write_text(f'{head}, "runs": [\n  {lines}\n]}}\n')


if __name__ == "__main__":
    main()
