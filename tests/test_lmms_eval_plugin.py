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
import torch
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
    with pytest.raises(ValueError, match="unknown mmdiff model_args dtype='float8'; known: auto, float32, bfloat16"):
        plugin.MMDiffLMMS(pretrained=str(model_dir), device="cpu", dtype="float8")
    half = plugin.MMDiffLMMS(pretrained=str(model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}


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


# --- one lmms-eval task end to end, as `lmms-eval --model mmdiff` runs it --------------------------
#: a generate_until task scored by lmms-eval's own exact_match, on a local `datasets` directory
#: (lmms-eval's offline mechanism: ``dataset_kwargs: {load_from_disk: true}``)
LMMS_TASK = "mmdiff_local_vqa"
TASK_YAML = """task: {task}
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
#: question families with one- or two-word answers, where the VQA normalisation of mmdiff's
#: exact_match comes down to lower-casing and dropping punctuation, as lmms-eval's does
SHORT_TYPES = ("attribute", "existence", "count", "position", "relation", "comparison")
E2E_ROWS, E2E_DECODE = 8, "gen_length=8"


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> tuple[Path, Path]:
    """(task directory with the YAML, mmdiff JSONL of the same rows): eight short-answer rows of the
    synthetic test split, the lmms-eval copy as a ``save_to_disk`` directory with the images in it."""
    import json

    import datasets

    from mmdiff.evaluation.metrics import normalize_answer

    root = tmp_path_factory.mktemp("lmms-task")
    data = write_split(root / "data", split="test", n=4 * E2E_ROWS, seed=0, progress=False)
    rows = [r for r in map(json.loads, data.read_text().splitlines()) if r["type"] in SHORT_TYPES][:E2E_ROWS]
    rows[-1]["answers"] = ["nothing the model says"]  # so that a perfect answer sheet does not score 1
    short = data.with_name("short.jsonl")
    short.write_text("".join(json.dumps(r) + "\n" for r in rows))
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image(),
                                  "answer": datasets.Value("string")})
    table = {"question": [r["question"] for r in rows], "image": [str(data.parent / r["image"]) for r in rows],
             "answer": [normalize_answer(r["answers"][0]) for r in rows]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(root / "hf")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{LMMS_TASK}.yaml").write_text(TASK_YAML.format(task=LMMS_TASK, dataset=root / "hf"))
    return root / "tasks", short


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub is off and any socket connection fails the test."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(self, address):
        raise AssertionError(f"network access to {address} during an offline lmms-eval run")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def lmms_eval_run(model_dir: Path, task_dir: Path) -> tuple[float, list[str]]:
    """lmms-eval's ``simple_evaluate`` with ``model="mmdiff"``: (exact_match, answers in doc order)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    plugin.register()
    out = simple_evaluate(model="mmdiff", model_args=f"pretrained={model_dir},{E2E_DECODE}", tasks=[LMMS_TASK],
                          batch_size=4, device="cpu", log_samples=True, bootstrap_iters=0, verbosity="WARNING",
                          task_manager=TaskManager("WARNING", include_path=str(task_dir), include_defaults=False))
    samples = sorted(out["samples"][LMMS_TASK], key=lambda s: s["doc_id"])
    return out["results"][LMMS_TASK]["exact_match,none"], [s["resps"][0][0] for s in samples]


def mmdiff_eval_run(model_dir: Path, data: Path, out: Path) -> tuple[float, list[str]]:
    """mmdiff's own evaluator on the same rows: (accuracy = mean exact match, answers in data order)."""
    import torch

    from mmdiff import load
    from mmdiff.evaluation.runner import PREDICTIONS_FILE, evaluate, read_jsonl

    decode = DecodeConfig().with_values(dict(a.split("=") for a in E2E_DECODE.split(",")), parse=True)
    metrics = evaluate(data, out, model_dir=model_dir, model=load(model_dir, dtype=torch.float32), decode=decode,
                       batch_size=4, progress=False)
    return metrics["accuracy"], [p["prediction"] for p in read_jsonl(out / PREDICTIONS_FILE)]


def llada_v_dir(root: Path) -> Path:
    """A tiny random LLaDA-V checkpoint in the released layout (tests/test_llada_v.py's writer)."""
    from test_llada_v import llada_v_config, write_llada_v

    write_llada_v(root / "LLaDA-V-tiny", config=llada_v_config(max_position_embeddings=1024))  # anyres tiles
    return root / "LLaDA-V-tiny"


@pytest.mark.parametrize("kind", ["mmdiff-tiny", "llada-v"])
def test_an_lmms_eval_task_end_to_end_scores_as_mmdiff_eval(kind, local_task, offline, tmp_path) -> None:
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed")
    from mmdiff import DEFAULT_MODEL_DIR

    task_dir, data = local_task
    model_dir = Path(DEFAULT_MODEL_DIR) if kind == "mmdiff-tiny" else llada_v_dir(tmp_path)
    score, answers = lmms_eval_run(model_dir, task_dir)
    expected_score, expected = mmdiff_eval_run(model_dir, data, tmp_path / "eval")
    assert len(answers) == E2E_ROWS and answers == expected
    assert score == pytest.approx(expected_score, abs=1e-12)
    if kind == "mmdiff-tiny":  # the trained model answers some of them right
        assert 0 < score < 1


def test_the_plugin_command_line_runs_the_task_end_to_end(local_task, offline, tmp_path) -> None:
    """``python -m mmdiff.evaluation.lmms_eval_plugin --model mmdiff ...`` (lmms-eval's own command
    line, :func:`plugin.main`), run in this process: its results file holds mmdiff eval's score."""
    pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval is not installed")
    import json

    from mmdiff import DEFAULT_MODEL_DIR

    task_dir, data = local_task
    plugin.main(["--model", "mmdiff", "--model_args", f"pretrained={DEFAULT_MODEL_DIR},{E2E_DECODE}",
                 "--tasks", LMMS_TASK, "--include_path", str(task_dir), "--batch_size", "4", "--device", "cpu",
                 "--output_path", str(tmp_path / "out"), "--log_samples", "--verbosity", "WARNING"])
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_*.jsonl")).read_text().splitlines()]
    expected_score, expected = mmdiff_eval_run(Path(DEFAULT_MODEL_DIR), data, tmp_path / "eval")
    assert results["results"][LMMS_TASK]["exact_match,none"] == pytest.approx(expected_score, abs=1e-12)
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == expected
