"""Tests of the lmms-eval plugin on a tiny random model: answers equal ``model.generate``'s, media
and stop strings are handled, unsupported calls fail clearly. Requests are a stand-in of
lmms-eval's ``Instance`` (``.args``) and ``task_dict``, so these run without lmms-eval; where
lmms-eval is installed the last tests use its own ``Instance``, base class and model registry."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdiff.data import write_split
from mmdiff.evaluation import lmms_eval_plugin as plugin
from mmdiff.sampling import DecodeConfig, SamplerConfig

TASK, SPLIT = "tiny_vqa", "test"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[dict]:
    """Task documents as a Hugging Face dataset gives them: PIL images in the doc."""
    root = tmp_path_factory.mktemp("docs")
    path = write_split(root, split="test", n=5, seed=0, progress=False)
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{"question": r["question"], "image": Image.open(root / r["image"]).convert("RGB"), "answers": r["answers"]}
            for r in rows]


@dataclass
class FakeInstance:
    """What lmms-eval's ``Instance`` offers a simple model: ``args`` =
    (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""

    args: tuple


def image_of(doc: dict) -> list:
    return [doc["image"]]


def requests_for(docs: list[dict], gen_kwargs: dict | None = None, make=FakeInstance) -> list:
    return [make((d["question"], dict(gen_kwargs or {"max_new_tokens": 16}), image_of, i, TASK, SPLIT))
            for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def lmm(model_dir: Path, docs: list[dict]) -> plugin.MMDiffLMMS:
    m = plugin.MMDiffLMMS(pretrained=str(model_dir), device="cpu", batch_size=2, gen_length=4)
    m.task_dict = {TASK: {SPLIT: dict(enumerate(docs))}}
    return m


def direct(lmm: plugin.MMDiffLMMS, docs: list[dict], batch_size: int = 2, pruning=None) -> list[str]:
    """The same answers straight from model.generate, batched the same way."""
    out = []
    for s in range(0, len(docs), batch_size):
        chunk = docs[s:s + batch_size]
        out += [r.text for r in lmm.model.generate([d["question"] for d in chunk], images=[d["image"] for d in chunk], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4), pruning=pruning))]
    return out


def test_generate_until_answers_with_the_mmdiff_sampler(lmm, docs) -> None:
    assert lmm.decode.sampler == SamplerConfig(gen_length=4)
    answers = lmm.generate_until(requests_for(docs))
    assert answers == direct(lmm, docs) and len(answers) == len(docs)


def test_pruning_options_from_model_args(model_dir, docs) -> None:
    from mmdiff.sampling.pruning import PruningConfig

    lmm = plugin.MMDiffLMMS(pretrained=str(model_dir), device="cpu", batch_size=2, gen_length=4, skip_layers="1",
                            prune_layer=1)
    lmm.task_dict = {TASK: {SPLIT: dict(enumerate(docs))}}
    assert lmm.decode.pruning == PruningConfig(skip_layers=(1,), prune_layer=1)
    assert lmm.generate_until(requests_for(docs)) == direct(lmm, docs, pruning=lmm.decode.pruning)


def test_stop_strings_cut_the_answer(lmm, docs) -> None:
    full = direct(lmm, docs)
    stop = next(a for a in full if a)[-1]
    answers = lmm.generate_until(requests_for(docs, {"until": [stop], "max_new_tokens": 3, "temperature": 0}))
    assert answers == [a.split(stop)[0] for a in full]


def test_media_forms(lmm, docs) -> None:
    req = FakeInstance(("how many?", {}, lambda doc: [doc["image"], doc["image"]], 0, TASK, SPLIT))
    with pytest.raises(ValueError, match="at most one image"):
        lmm.generate_until([req])
    # an audio dict (HF Audio) reaches the model as (array, rate); this model has no audio
    # encoder, so the task is refused (not scored as empty answers)
    clip = {"array": np.sin(np.linspace(0, 400, 16000)).astype(np.float32), "sampling_rate": 16000}
    reqs = requests_for(docs[:2])
    reqs[1] = FakeInstance(("what is said?", {}, lambda doc: [clip], 1, TASK, SPLIT))
    with pytest.raises(ValueError, match=f"{TASK} doc 1: this model has no audio encoder.*not a task for this model"):
        lmm.generate_until(reqs)
    # text-only request (no doc_to_visual)
    assert isinstance(lmm.generate_until([FakeInstance(("yes or no?", {}, None, 0, TASK, SPLIT))])[0], str)


def test_unsupported_calls_and_bad_arguments_fail_clearly(lmm, model_dir) -> None:
    with pytest.raises(NotImplementedError, match="no left-to-right log-likelihood"):
        lmm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="single-round"):
        lmm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="unknown mmdiff model_args \\['gen_len'\\]; known: .*gen_length.*keep_ratio"):
        plugin.MMDiffLMMS(pretrained=str(model_dir), device="cpu", gen_len=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plugin.MMDiffLMMS(pretrained=str(model_dir / "nope"), device="cpu")


def test_without_lmms_eval_the_module_imports_and_registration_says_why(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "lmms_eval" or n.startswith("lmms_eval.")] + ["lmms_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules = "not installed"
    spec = importlib.util.find_spec("mmdiff.evaluation.lmms_eval_plugin")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._MISSING is not None and fresh.MMDiffLMMS.is_simple
    for call in (fresh.register, fresh.manifest, fresh.main):
        with pytest.raises(ImportError, match="pip install lmms-eval"):
            call()


# --- with lmms-eval itself (skipped where it is not installed) -------------------------------------

def test_real_lmms_eval_instances_and_registry(model_dir, docs) -> None:
    pytest.importorskip("lmms_eval.api.registry", reason="lmms-eval is not installed")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import MODEL_REGISTRY

    assert issubclass(plugin.MMDiffLMMS, lmms) and MODEL_REGISTRY["mmdiff"] is plugin.MMDiffLMMS
    plugin.register()
    from lmms_eval.models import get_model

    cls = get_model("mmdiff")
    assert cls is plugin.MMDiffLMMS
    # the way lmms-eval's evaluator builds a model from --model_args
    lm = cls.create_from_arg_string(f"pretrained={model_dir},gen_length=4,steps=None",
                                    {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    lm.task_dict = {TASK: {SPLIT: dict(enumerate(docs))}}

    def make(args: tuple) -> Instance:
        return Instance(request_type="generate_until", arguments=args, idx=0,
                        metadata={"task": TASK, "doc_id": args[3], "repeats": 1})

    assert lm.generate_until(requests_for(docs, make=make)) == direct(lm, docs)
