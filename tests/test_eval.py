"""Tests of ``mmdiff eval``: the VQA normaliser and metrics on hand-written predictions, and the
runner end to end on a tiny random model (real ``generate``): known answers, resume after an
interruption, shards + merge (also under torchrun) equal to one process, bad rows, clear errors."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmdiff import cli
from mmdiff.data import write_split
from mmdiff.evaluation import (
    Shard,
    evaluate,
    exact_match,
    merge_shards,
    normalize_answer,
    stats,
    summarize,
    vqa_accuracy,
)
from mmdiff.sampling import DecodeConfig, SamplerConfig

GEN = ["--gen-length", "4"]  # every run in this file; short canvases keep the tiny model fast
TIMING = {"latency_s", "merged_shards"}


# --- normaliser and metrics on hand-written predictions -------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the dog.", "dog"), ("isnt", "isn't"), ("isn't", "isn't"), ("Yes!", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"), ("ten dollars", "10 dollars"), ("A man's hat", "man 's hat"), ("hello-world", "hello world"),
    ("x - y", "x y"), ("dont know", "don't know"), ("Mr. Smith", "mr smith"), ("10 a.m.", "10 am"),
    ("  The Cat; sat\n", "cat sat"), ("(none)", "0"), ("an apple", "apple"), ("whats up", "what's up"),
])
def test_normalize_answer_matches_the_vqa_eval_script(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_normalises_both_sides() -> None:
    assert exact_match("Two", ["2"]) == 1.0
    assert exact_match("the dog.", ["cat", "Dog"]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0


def test_vqa_accuracy_is_the_vqav2_soft_score() -> None:
    # 10 answers: mean over the 10 leave-one-out subsets of min(matches / 3, 1)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    # 3 to 9 answers: min(matches / 3, 1) over all of them
    assert vqa_accuracy("dog", ["dog", "the dog", "cat"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("dog", ["dog", "dog", "dog", "cat"]) == 1.0


@pytest.mark.parametrize("prediction, answers, score", [
    ("Yes", ["yes"], 1.0), ("no", ["yes"], 0.0), ("Two", ["2", "two objects"], 1.0),
    ("two objects", ["2", "two objects"], 1.0), ("3", ["2", "two objects"], 0.0),
])
def test_vqa_accuracy_is_exact_match_below_three_references(prediction: str, answers: list[str],
                                                             score: float) -> None:
    """One or two references are no annotator pool: a right answer is right (1, not 1/3)."""
    assert vqa_accuracy(prediction, answers) == exact_match(prediction, answers) == score


def test_stats_mean_median_p90() -> None:
    assert stats(range(1, 11)) == {"mean": 5.5, "median": 5.5, "p90": 9}
    assert stats([3.0]) == {"mean": 3.0, "median": 3.0, "p90": 3.0}
    assert stats([]) == {"mean": None, "median": None, "p90": None}


def test_summarize_hand_written_predictions() -> None:
    def pred(t: str, em: float, vqa: float, nfe: int, lat: float) -> dict:
        return {"type": t, "exact_match": em, "vqa_accuracy": vqa, "nfe": nfe, "latency_s": lat}

    preds = [pred("count", 1.0, 1.0, 4, 0.1), pred("count", 0.0, 0.0, 4, 0.3), pred("color", 1.0, 1 / 3, 2, 0.2)]
    m = summarize(preds, errors=2)
    assert m["n"] == 3 and m["errors"] == 2
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["vqa_accuracy"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert m["by_type"] == {"color": {"n": 1, "accuracy": 1.0, "vqa_accuracy": pytest.approx(1 / 3)},
                            "count": {"n": 2, "accuracy": 0.5, "vqa_accuracy": 0.5}}
    assert m["nfe"] == {"mean": pytest.approx(10 / 3), "median": 4, "p90": 4}
    assert m["latency_s"]["median"] == 0.2
    assert summarize([], errors=1)["accuracy"] is None


def test_shard_parse() -> None:
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("2/2", "a/b", "1", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)


# --- the runner on a tiny random model ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """10 real rows (``write_split``) with 6 bad lines between them."""
    root = tmp_path_factory.mktemp("mixed")
    good = jsonl(write_split(root, split="test", n=10, seed=0, progress=False))
    (root / "images" / "corrupt.png").write_bytes(b"this is not a png")
    image = good[0]["image"]
    bad = {
        2: {"id": "corrupt", "image": "images/corrupt.png", "question": "how many?", "answers": ["1"],
            "type": "count"},
        4: {"id": "no-image", "image": "images/missing.png", "question": "how many?", "answers": ["1"],
            "type": "count"},
        6: '{"id": "broken", "image": ',
        9: {"id": "no-question", "image": image, "answers": ["1"], "type": "count"},
        11: {"id": "no-answers", "image": image, "question": "how many?", "answers": [], "type": "count"},
        13: {**good[1], "question": "a second row with the id of line 2"},
    }
    lines, rows = [], iter(good)
    for i in range(16):
        entry = bad.get(i) or next(rows)
        lines.append(entry if isinstance(entry, str) else json.dumps(entry))
    path = root / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


EXPECTED_ERRORS = [(3, "corrupt", "cannot read image"), (5, "no-image", "image file not found"),
                   (7, None, "invalid JSON"), (10, "no-question", "neither 'question' nor 'audio'"),
                   (12, "no-answers", "'answers' must be a non-empty list"), (14, None, "duplicate id")]


def mmdiff_eval(*args, model: Path) -> int:
    return cli.main(["eval", "--model", str(model), "--quiet", *GEN, *map(str, args)])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def untimed(records: list[dict] | dict) -> list[dict] | dict:
    if isinstance(records, dict):
        return {k: v for k, v in records.items() if k not in TIMING}
    return [untimed(r) for r in records]


@pytest.fixture(scope="module")
def single_run(mixed_data: Path, model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--batch-size", 3, model=model_dir) == 0
    return out


def test_metrics_on_known_answers(tmp_path: Path, mixed_data: Path, model_dir: Path) -> None:
    """Answers written from the model's own (real) outputs: which rows are right is known."""
    from mmdiff.model import MultimodalDiffusionLM

    shutil.copytree(mixed_data.parent / "images", tmp_path / "images")
    rows = jsonl(mixed_data.parent / "data.jsonl")[:4]
    model = MultimodalDiffusionLM.from_pretrained(model_dir)
    said = [r.text for r in model.generate([r["question"] for r in rows], images=[mixed_data.parent / r["image"] for r in rows], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4)))]
    answers = [[said[0].upper() + "."],  # right after normalisation, 1 reference -> exact match, vqa 1
               [said[1]] * 2 + ["zzz"] * 8,  # 2 of 10 annotators -> vqa 0.6
               ["zzz"],  # wrong
               [said[3]] * 3]  # 3 annotators -> vqa 1
    types = ["count", "count", "color", "color"]
    data = tmp_path / "known.jsonl"
    data.write_text("".join(json.dumps({**r, "answers": a, "type": t}) + "\n" for r, a, t in zip(rows, answers, types)))

    assert mmdiff_eval("--data", data, "--out", tmp_path / "out", "--batch-size", 4, model=model_dir) == 0
    m = metrics_of(tmp_path / "out")
    assert [p["prediction"] for p in jsonl(tmp_path / "out" / "predictions.jsonl")] == said
    assert m["n"] == 4 and m["errors"] == 0 and m["complete"] and m["rows"] == 4
    assert m["accuracy"] == 0.75
    assert m["vqa_accuracy"] == pytest.approx((1 + 0.6 + 0 + 1) / 4)
    assert m["by_type"] == {"color": {"n": 2, "accuracy": 0.5, "vqa_accuracy": 0.5},
                            "count": {"n": 2, "accuracy": 1.0, "vqa_accuracy": pytest.approx((1 + 0.6) / 2)}}
    assert m["nfe"] == {"mean": 4, "median": 4, "p90": 4}
    assert set(m["latency_s"]) == {"mean", "median", "p90"} and m["latency_s"]["mean"] > 0
    assert m["sampler"] == SamplerConfig(gen_length=4).to_dict() and m["cache"] == "none" and m["canvas"] is None
    assert m["search"]["strategy"] == "none" and "candidates" not in jsonl(tmp_path / "out" / "predictions.jsonl")[0]
    assert m["model"] == str(model_dir.resolve()) and m["data"] == str(data.resolve())


def test_pruning_flags_reach_generate_and_the_run_identity(tmp_path: Path, mixed_data: Path, model_dir: Path,
                                                           capsys) -> None:
    from mmdiff.model import MultimodalDiffusionLM
    from mmdiff.sampling.pruning import PruningConfig

    data, out = mixed_data.parent / "data.jsonl", tmp_path / "out"
    pruning = PruningConfig(skip_layers=(1,), prune_layer=1)
    rows = jsonl(data)[:4]
    said = [r.text for r in MultimodalDiffusionLM.from_pretrained(model_dir).generate([r["question"] for r in rows], images=[data.parent / r["image"] for r in rows], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4), pruning=pruning))]
    flags = ["--data", data, "--out", out, "--limit", 4, "--batch-size", 4]
    assert mmdiff_eval(*flags, "--skip-layers", "1", "--prune-layer", 1, model=model_dir) == 0
    assert [p["prediction"] for p in jsonl(out / "predictions.jsonl")] == said
    assert metrics_of(out)["pruning"] == json.loads(json.dumps(pruning.to_dict()))
    assert mmdiff_eval(*flags, "--prune-layer", 1, model=model_dir) == 2
    assert "pruning skip_layers [1] -> []" in capsys.readouterr().err


def test_search_flags_answer_row_by_row_and_enter_the_run_identity(tmp_path: Path, mixed_data: Path,
                                                                   model_dir: Path, capsys) -> None:
    from mmdiff.model import MultimodalDiffusionLM
    from mmdiff.sampling import SearchConfig
    from mmdiff.search import search

    data, out = mixed_data.parent / "data.jsonl", tmp_path / "out"
    flags = ["--data", data, "--out", out, "--limit", 3, "--search", "hierarchical", "--candidates", 2]
    assert mmdiff_eval(*flags, model=model_dir) == 0
    config = SearchConfig(strategy="hierarchical", candidates=2)
    model = MultimodalDiffusionLM.from_pretrained(model_dir)
    expected = [search(model, r["question"], image=data.parent / r["image"], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4), search=config)) for r in jsonl(data)[:3]]
    preds = jsonl(out / "predictions.jsonl")
    assert [p["prediction"] for p in preds] == [e.text for e in expected]
    assert [p["nfe"] for p in preds] == [e.nfe for e in expected] and all(e.nfe > 4 for e in expected)
    assert [[c["text"] for c in p["candidates"]] for p in preds] == [[t for t, _ in e.candidates] for e in expected]
    search_dict = json.loads(json.dumps(config.to_dict()))
    assert metrics_of(out)["search"] == search_dict and metrics_of(out)["n"] == 3
    assert json.loads((out / "run.json").read_text())["search"] == search_dict
    assert mmdiff_eval(*flags[:-1], 3, model=model_dir) == 2  # another N: not the same run
    assert "search candidates 2 -> 3" in capsys.readouterr().err
    assert mmdiff_eval(*flags, "--skip-layers", 1, model=model_dir) == 2  # search + skipping: another run
    assert "pruning skip_layers [] -> [1]" in capsys.readouterr().err


def test_bad_rows_are_reported_and_the_run_goes_on(single_run: Path) -> None:
    errors = jsonl(single_run / "errors.jsonl")
    first_id = jsonl(single_run / "predictions.jsonl")[1]["id"]  # line 2's id, reused on line 14
    expected = [(line, first_id if reason == "duplicate id" else row_id, reason)
                for line, row_id, reason in EXPECTED_ERRORS]
    assert [(e["line"], e["id"]) for e in errors] == [(line, row_id) for line, row_id, _ in expected]
    for e, (_, _, reason) in zip(errors, expected):
        assert reason in e["reason"]
    preds = jsonl(single_run / "predictions.jsonl")
    assert len(preds) == 10 and len({p["id"] for p in preds}) == 10
    # the corrupt image shared a batch (lines 1-3) with good rows: they were still answered
    assert {p["line"] for p in preds} >= {1, 2}
    m = metrics_of(single_run)
    assert m["n"] == 10 and m["errors"] == 6 and m["rows"] == 16 and m["complete"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, single_run: Path, mixed_data: Path,
                                                    model_dir: Path) -> None:
    out = tmp_path / "out"
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--batch-size", 2, "--limit", 5, model=model_dir) == 0
    first = (out / "predictions.jsonl").read_text()
    m = metrics_of(out)
    assert m["rows"] == 5 and m["n"] + m["errors"] == 5 and m["complete"] and m["limit"] == 5
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--batch-size", 2, model=model_dir) == 0
    assert (out / "predictions.jsonl").read_text().startswith(first)  # finished rows were not redone
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))
    assert jsonl(out / "errors.jsonl") == jsonl(single_run / "errors.jsonl")
    assert untimed(metrics_of(out)) == untimed(metrics_of(single_run))


def test_a_line_torn_by_a_crash_is_redone(tmp_path: Path, single_run: Path, mixed_data: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    text = (out / "predictions.jsonl").read_text()
    (out / "predictions.jsonl").write_text(text[: text.rindex("\n", 0, -1) + 20])  # kill in the last write
    assert mmdiff_eval("--data", mixed_data, "--out", out, model=model_dir) == 0
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))


def test_resume_with_another_config_model_or_data_is_refused(tmp_path: Path, single_run: Path, mixed_data: Path,
                                                             model_dir: Path, capsys) -> None:
    before = (single_run / "predictions.jsonl").read_text()
    assert mmdiff_eval("--data", mixed_data, "--out", single_run, "--steps", 2, model=model_dir) == 2
    assert "different run" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(model_dir), "--quiet", "--gen-length", "5", "--data", str(mixed_data),
                     "--out", str(single_run)]) == 2
    assert "sampler gen_length 4 -> 5" in capsys.readouterr().err
    other_model = tmp_path / "model"
    shutil.copytree(model_dir, other_model)
    assert mmdiff_eval("--data", mixed_data, "--out", single_run, model=other_model) == 2
    assert "model" in capsys.readouterr().err
    other_data = tmp_path / "mixed.jsonl"
    shutil.copytree(mixed_data.parent / "images", tmp_path / "images")
    other_data.write_text(mixed_data.read_text().replace("how many?", "how many??"))
    assert mmdiff_eval("--data", other_data, "--out", single_run, model=model_dir) == 2
    assert "data" in capsys.readouterr().err
    assert (single_run / "predictions.jsonl").read_text() == before


def test_two_shards_merged_equal_one_process(tmp_path: Path, single_run: Path, mixed_data: Path,
                                             model_dir: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no shard"):
        merge_shards(out)
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--shard", "1/2", "--batch-size", 3, model=model_dir) == 0
    with pytest.raises(ValueError, match="shard.s. 0/2 missing"):
        merge_shards(out)
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--shard", "0/2", "--batch-size", 3, model=model_dir) == 0
    shard0 = jsonl(out / "shard-0-of-2" / "predictions.jsonl") + jsonl(out / "shard-0-of-2" / "errors.jsonl")
    assert shard0 and all(r["index"] % 2 == 0 for r in shard0)
    assert cli.main(["eval", "--merge", str(out)]) == 0
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))
    assert jsonl(out / "errors.jsonl") == jsonl(single_run / "errors.jsonl")
    merged, single = metrics_of(out), metrics_of(single_run)
    assert merged["merged_shards"] == 2
    assert untimed(merged) == untimed(single)


def test_merge_refuses_unfinished_or_mismatched_shards(tmp_path: Path, single_run: Path, mixed_data: Path,
                                                       model_dir: Path) -> None:
    out = tmp_path / "out"
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--shard", "0/2", model=model_dir) == 0
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--shard", "1/2", "--limit", 3, model=model_dir) == 0
    with pytest.raises(ValueError, match="different --limit"):
        merge_shards(out)
    (out / "shard-1-of-2" / "metrics.json").unlink()  # as if killed before its first metrics write
    with pytest.raises(ValueError, match="shard.s. 1/2 unfinished"):
        merge_shards(out)
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--shard", "1/2", model=model_dir) == 0
    assert merge_shards(out)["n"] == 10
    busy = tmp_path / "busy"
    shutil.copytree(single_run, busy)
    for d in out.glob("shard-*"):
        shutil.copytree(d, busy / d.name)
    with pytest.raises(ValueError, match="single-process run"):
        merge_shards(busy)


def test_missing_data_or_model_stops_with_a_clear_error(tmp_path: Path, mixed_data: Path, model_dir: Path,
                                                        capsys) -> None:
    out = tmp_path / "out"
    assert mmdiff_eval("--data", tmp_path / "nope.jsonl", "--out", out, model=model_dir) == 2
    assert f"dataset file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    assert mmdiff_eval("--data", mixed_data, "--out", out, model=tmp_path / "no-model") == 2
    assert f"model directory {tmp_path / 'no-model'} does not exist" in capsys.readouterr().err
    assert cli.main(["eval", "--quiet", "--out", str(out)]) == 2
    assert "--data and --out are required" in capsys.readouterr().err
    assert not out.exists()



@pytest.mark.parametrize("name, content, message", [
    ("missing.parquet", None, "dataset file not found: {p}"),
    ("broken.json", '[{"id": "a", "conversations": [', "{p}: not a valid JSON list (Expecting value"),
    ("garbage.parquet", "not parquet at all", "{p}: not readable as a HF dataset (Parquet magic bytes not found"),
    ("emptydir", "", "{p}: not readable as a HF dataset (The directory at {p} doesn't contain any data files)"),
])
def test_unreadable_llava_or_parquet_data_is_one_line(tmp_path: Path, model_dir: Path, capsys, name, content,
                                                      message) -> None:
    """``mmdiff eval --data`` on a LLaVA / HF path that cannot be read: exit 2, one line naming the file."""
    path = tmp_path / name
    if content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert mmdiff_eval("--data", path, "--out", tmp_path / "out", model=model_dir) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message.format(p=path) in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [[], GEN, ["--engine"]], ids=["per-type-canvas", "gen-length", "engine"])
def test_data_with_no_usable_row_exits_2_before_the_model_loads(tmp_path: Path, model_dir: Path, capsys,
                                                                monkeypatch, flags) -> None:
    """Every row bad: one line naming the file and the first reason, exit 2, no model loaded, nothing written."""
    from mmdiff.evaluation import canvas, runner
    from mmdiff.evaluation import cli as eval_cli

    def no_load(*_, **__):
        raise AssertionError("the model was loaded")

    for module, name in ((runner, "load"), (eval_cli, "load"), (canvas, "text_tokenizer")):
        monkeypatch.setattr(module, name, no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "nope.png", "question": "q?", "answers": ["a"]}) + "\n{oops\n")
    argv = ["eval", "--model", str(model_dir), "--quiet", "--data", str(bad), "--out", str(tmp_path / "out"), *flags]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0] == (f"mmdiff eval: error: --data {bad}: no usable rows (2 skipped; first: "
                                        f"line 1: image file not found: {tmp_path / 'nope.png'})"), err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_shards_by_rank_and_merges(tmp_path: Path, single_run: Path, mixed_data: Path,
                                            model_dir: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "mmdiff", "eval", "--model", str(model_dir), "--data", str(mixed_data), "--out", str(out),
           "--batch-size", "3", "--quiet", *GEN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "shard-0-of-2").is_dir() and (out / "shard-1-of-2").is_dir()
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))
    assert untimed(metrics_of(out)) == untimed(metrics_of(single_run))


# --- a canvas per question type -------------------------------------------------------------------

LONG = "a small red circle at the top left and a large blue square at the center"


def test_canvas_per_type_holds_the_longest_answer_of_the_type(tiny_tokenizer) -> None:
    from mmdiff.data.dataset import Row
    from mmdiff.evaluation.canvas import Canvas, canvas_per_type

    def row(i: int, qtype: str, *answers: str) -> Row:
        return Row(id=str(i), image=None, question="q", answers=list(answers), type=qtype, audio=None, line_no=i)

    n_tokens = lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = [row(0, "count", "3"), row(1, "caption", LONG[:12]), row(2, "caption", "x", LONG), row(3, "count", "2")]
    canvases = canvas_per_type(rows, tiny_tokenizer)
    longest = n_tokens(LONG)
    assert canvases == {"caption": Canvas(8 * -(-(longest + 1) // 8), longest, 2), "count": Canvas(8, 1, 2)}
    assert canvases["caption"].length >= longest + 1 and canvases["caption"].length % 8 == 0
    # a property of the type, not of the row: the short caption gets the long caption's canvas, in any order
    assert canvas_per_type(rows[::-1], tiny_tokenizer) == canvases
    assert canvas_per_type(rows, tiny_tokenizer, multiple=24)["count"].length == 24


@pytest.fixture(scope="module")
def typed_data(mixed_data: Path) -> Path:
    """6 real rows (images of ``mixed_data``): counts answered "1", captions of different lengths."""
    rows = jsonl(mixed_data.parent / "data.jsonl")[:6]
    for i, r in enumerate(rows):
        r["type"], r["answers"] = ("caption", [LONG[:15 + 10 * i]]) if i % 2 else ("count", ["1"])
    path = mixed_data.parent / "typed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_per_type(*args, model: Path) -> int:
    """``mmdiff eval`` without --gen-length (2 steps keep the long canvases fast)."""
    return cli.main(["eval", "--model", str(model), "--quiet", "--steps", "2", *map(str, args)])


def test_each_type_is_answered_on_its_own_canvas_and_says_so(tmp_path: Path, typed_data: Path, model_dir: Path,
                                                              capsys) -> None:
    from mmdiff.evaluation.canvas import choose_canvases

    out = tmp_path / "out"
    assert eval_per_type("--data", typed_data, "--out", out, "--batch-size", 2, model=model_dir) == 0
    canvases = {t: c.length for t, c in choose_canvases(typed_data, model_dir, DecodeConfig()).items()}
    assert canvases["count"] == 8 and canvases["caption"] > 8
    err = capsys.readouterr().err
    for qtype, length in canvases.items():
        assert f"mmdiff eval: {qtype}: {length}-token canvas (longest answer in its 3 rows:" in err
    preds = jsonl(out / "predictions.jsonl")
    assert [p["index"] for p in preds] == list(range(6))  # data order, though batched by canvas
    assert all(p["canvas"] == canvases[p["type"]] for p in preds)
    run, m = json.loads((out / "run.json").read_text()), metrics_of(out)
    assert run["canvas"] == m["canvas"] == canvases and run["sampler"]["gen_length"] is None
    # the canvases are part of the run's identity: one canvas for all is another run
    assert eval_per_type("--data", typed_data, "--out", out, "--gen-length", 8, model=model_dir) == 2
    assert "sampler gen_length None -> 8" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no canvas for question type\(s\) \['caption'\]"):
        evaluate(typed_data, tmp_path / "partial", model_dir=model_dir, canvases={"count": 8})
    assert not (tmp_path / "partial").exists()


def test_a_per_type_run_resumed_equals_an_uninterrupted_one(tmp_path: Path, typed_data: Path,
                                                            model_dir: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert eval_per_type("--data", typed_data, "--out", whole, "--batch-size", 4, model=model_dir) == 0
    assert eval_per_type("--data", typed_data, "--out", parts, "--batch-size", 4, "--limit", 3, model=model_dir) == 0
    assert json.loads((parts / "run.json").read_text())["canvas"] == metrics_of(whole)["canvas"]  # from every row
    assert eval_per_type("--data", typed_data, "--out", parts, "--batch-size", 4, model=model_dir) == 0
    assert untimed(jsonl(parts / "predictions.jsonl")) == untimed(jsonl(whole / "predictions.jsonl"))
    assert untimed(metrics_of(parts)) == untimed(metrics_of(whole))


# --- on the step-batching engine ------------------------------------------------------------------

def test_an_engine_run_equals_a_plain_run(tmp_path: Path, single_run: Path, mixed_data: Path,
                                          model_dir: Path) -> None:
    """Bad rows too: the engine refuses them at submit with the messages generate gives."""
    out = tmp_path / "out"
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--engine", "--max-batch", 3, model=model_dir) == 0
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))
    assert jsonl(out / "errors.jsonl") == jsonl(single_run / "errors.jsonl")
    assert untimed(metrics_of(out)) == untimed(metrics_of(single_run))


def test_an_engine_run_killed_mid_way_resumes_to_the_same_result(tmp_path: Path, single_run: Path, mixed_data: Path,
                                                                 model_dir: Path, monkeypatch) -> None:
    from mmdiff.serving.engine import Engine

    out, step, steps = tmp_path / "out", Engine.step, []

    def dying_step(self):
        steps.append(1)
        if len(steps) > 4:
            raise KeyboardInterrupt  # the run is killed after its 4th denoising step
        return step(self)

    monkeypatch.setattr(Engine, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        mmdiff_eval("--data", mixed_data, "--out", out, "--engine", "--max-batch", 2, model=model_dir)
    written = jsonl(out / "predictions.jsonl")
    assert 0 < len(written) < 10  # rows were written as they finished
    monkeypatch.setattr(Engine, "step", step)
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--engine", "--max-batch", 2, model=model_dir) == 0
    assert (out / "predictions.jsonl").read_text().count("\n") == 10
    assert untimed(jsonl(out / "predictions.jsonl")) == untimed(jsonl(single_run / "predictions.jsonl"))
    assert untimed(metrics_of(out)) == untimed(metrics_of(single_run))


def test_per_type_canvases_share_the_engine_and_resume(tmp_path: Path, typed_data: Path, model_dir: Path) -> None:
    """Rows of two canvas lengths in one pool, confident decoding (each row stops on its own); a
    plain run interrupted by --limit and finished on the engine equals a plain run."""
    whole, parts, threshold = tmp_path / "whole", tmp_path / "parts", ["--transfer", "threshold", "--threshold", 0.5]
    assert eval_per_type("--data", typed_data, "--out", whole, "--batch-size", 4, *threshold, model=model_dir) == 0
    assert eval_per_type("--data", typed_data, "--out", parts, "--limit", 3, *threshold, model=model_dir) == 0
    assert eval_per_type("--data", typed_data, "--out", parts, "--engine", *threshold, model=model_dir) == 0
    got, expected = jsonl(parts / "predictions.jsonl"), jsonl(whole / "predictions.jsonl")
    assert [p["index"] for p in got] == list(range(6)) and len({p["canvas"] for p in got}) == 2
    # a generate batch reports its batch's steps as each row's nfe; the engine, the row's own
    assert untimed([{**p, "nfe": None} for p in got]) == untimed([{**p, "nfe": None} for p in expected])


@pytest.mark.parametrize("flags, message", [
    (["--cache", "dual"], "--engine: the batching engine runs caches prefix, none, not 'dual'"),
    (["--cache", "prefix"], "--engine: cache 'prefix' is exact only for models trained with the prefix mask"),
    (["--skip-layers", "1"], "--engine: the batching engine does not prune tokens or skip layers"),
    (["--search", "best_of_n"], "--engine: the batching engine does not run a test-time search"),
])
def test_what_the_engine_cannot_batch_is_refused_in_one_line_before_any_work(tmp_path: Path, mixed_data: Path,
                                                                            model_dir: Path, capsys, flags,
                                                                            message) -> None:
    out = tmp_path / "out"
    assert mmdiff_eval("--data", mixed_data, "--out", out, "--engine", *flags, model=model_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmdiff eval: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_max_batch_without_engine_is_refused(tmp_path: Path, mixed_data: Path, model_dir: Path, capsys) -> None:
    assert mmdiff_eval("--data", mixed_data, "--out", tmp_path / "out", "--max-batch", 4, model=model_dir) == 2
    assert "--max-batch sets the engine's batch: give --engine too" in capsys.readouterr().err


# --- output folders and devices -------------------------------------------------------------------

def test_an_output_path_that_cannot_be_a_folder_is_refused_untouched(tmp_path: Path, mixed_data: Path,
                                                                     model_dir: Path, capsys) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    assert mmdiff_eval("--data", mixed_data, "--out", taken, model=model_dir) == 2
    assert capsys.readouterr().err == (f"mmdiff eval: error: --out {taken} is an existing file, not a folder: give a "
                                       "folder path (the file is left as it is)\n")
    assert mmdiff_eval("--data", mixed_data, "--out", taken / "run", model=model_dir) == 2
    assert f"--out {taken / 'run'}: {taken} is a file, so no folder can be made under it" in capsys.readouterr().err
    assert cli.main(["eval", "--merge", str(taken)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


def test_a_read_only_output_folder_is_refused_and_results_stay(single_run: Path, tmp_path: Path, mixed_data: Path,
                                                               model_dir: Path, monkeypatch, capsys) -> None:
    import os

    before = {p.name: p.read_bytes() for p in single_run.iterdir()}
    real = os.statvfs

    class ReadOnly:  # what statvfs says of a read-only mount (tests run as root: chmod would not stop writes)
        def __init__(self, path):
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    assert mmdiff_eval("--data", mixed_data, "--out", single_run, model=model_dir) == 2
    assert capsys.readouterr().err == f"mmdiff eval: error: --out {single_run}: {single_run} is on a read-only file system\n"
    assert {p.name: p.read_bytes() for p in single_run.iterdir()} == before


def test_a_missing_device_is_one_line(tmp_path: Path, mixed_data: Path, model_dir: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is available")
    assert mmdiff_eval("--data", mixed_data, "--out", tmp_path / "out", "--device", "cuda", model=model_dir) == 2
    assert capsys.readouterr().err == ("mmdiff eval: error: --device cuda: not available on this machine; "
                                       "available: cpu\n")
    assert mmdiff_eval("--data", mixed_data, "--out", tmp_path / "out", "--device", "gpu0", model=model_dir) == 2
    assert "--device 'gpu0' is not a device name; available: cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_result_files_honour_the_umask(single_run: Path, tmp_path: Path, mixed_data: Path, model_dir: Path) -> None:
    import os

    old = os.umask(0o027)
    try:
        out = tmp_path / "out"
        assert mmdiff_eval("--data", mixed_data, "--out", out, "--limit", 2, model=model_dir) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(["run.json", "metrics.json", "predictions.jsonl", "errors.jsonl"], 0o640)
    assert {p.name: p.stat().st_mode & 0o777 for p in single_run.iterdir()} == \
        dict.fromkeys(modes, 0o666 & ~old)  # the session's umask (0644 under the usual 022)
