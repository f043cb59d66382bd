"""Users' data (#21): readers of every format with bad rows, multi-turn answer-only items, fine-tuning a
tiny model whose output ask / eval load unchanged, resume = uninterrupted, a new word learnt, LoRA."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdiff.data.readers import as_rows, check_usable, detect_format, read_dataset, report
from mmdiff.model import MultimodalDiffusionLM
from mmdiff.training.finetune import FinetuneConfig, FineTuner
from mmdiff.training.state import STATE_NAME

ROOT = Path(__file__).resolve().parents[1]


def image(path: Path, colour=(200, 30, 30), size=(48, 32)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name if path.parent.name != "images" else f"images/{path.name}"


def turn(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def llava_file(tmp_path: Path, n: int = 6, answer: str = "magenta") -> Path:
    recs = []
    for i in range(n):
        img = image(tmp_path / "images" / f"{i}.png", colour=(40 * i % 255, 30, 200))
        recs.append({"id": f"r{i}", "image": img, "type": "colour",
                     "conversations": turn("<image>\nwhat colour is it?", answer)})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    return path


def test_llava_reader_skips_and_counts_bad_rows(tmp_path):
    ok = image(tmp_path / "images" / "a.png")
    good = {"id": "g", "image": ok, "conversations": turn("<image>\nwhat is it?", "a star")
            + turn("is it red?", "yes")}
    lines = [json.dumps(good),
             json.dumps({"id": "m", "image": "images/missing.png", "conversations": turn("<image>\nq?", "a")}),
             json.dumps({"id": "v", "image": ok, "conversations": turn("<video>\nq?", "a")}),
             json.dumps({"id": "e", "image": ok, "conversations": []}),
             json.dumps({"id": "two", "image": ok, "conversations": turn("<image><image> q?", "a")}),
             json.dumps({"id": "noq", "image": ok, "conversations": [{"from": "gpt", "value": "a"}]}),
             "{not json"]
    data = "\n".join(lines).encode() + b'\n{"id": "bytes", "image": "' + ok.encode() + \
        b'", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "a"}]}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    res = read_dataset(path)
    assert res.format == "llava" and [c.id for c in res.conversations] == ["g"]
    assert res.questions == 2 and [t.answers for t in res.conversations[0].turns] == [["a star"], ["yes"]]
    reasons = {e.id: e.reason for e in res.errors}
    assert "image file not found" in reasons["m"]
    assert "unknown placeholder <video>" in reasons["v"]
    assert "empty" in reasons["e"]
    assert "2 <image> placeholder(s) but 1 image(s)" in reasons["two"]
    assert "answer without a question" in reasons["noq"]
    assert "non-UTF-8" in reasons["bytes"]
    assert any("invalid JSON" in e.reason for e in res.errors)
    text = report(res)
    assert "1 usable records (2 questions), 7 skipped" in text and "skipped line 2 (id m)" in text
    rows = as_rows(res)  # what mmdiff eval answers: one row per turn
    assert [r.id for r in rows if hasattr(r, "question")][:2] == ["g-0", "g-1"]


def test_every_format_reads_the_same_question(tmp_path):
    img = image(tmp_path / "images" / "0.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "0", "image": img, "question": "what is it?",
                                                  "answers": ["a star"], "type": "shape"}) + "\n")
    (tmp_path / "l.json").write_text(json.dumps([{"id": "0", "image": img, "type": "shape",
                                                  "conversations": turn("what is it?\n<image>", "a star")}]))
    import datasets

    datasets.Dataset.from_dict({"image": [str(tmp_path / img)], "question": ["what is it?"], "answer": ["a star"],
                                "type": ["shape"]}).to_parquet(str(tmp_path / "p.parquet"))
    folder = tmp_path / "folder"
    image(folder / "0.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "question": "what is it?",
                                                       "answer": "a star", "type": "shape"}) + "\n")
    for name, fmt in (("m.jsonl", "mmdiff"), ("l.json", "llava"), ("p.parquet", "hf"), ("folder", "hf")):
        res = read_dataset(tmp_path / name)
        assert res.format == fmt == detect_format(tmp_path / name), name
        [c] = res.conversations
        assert (c.turns[0].question, c.turns[0].answers, c.turns[0].type) == ("what is it?", ["a star"], "shape"), name
        assert c.image is not None and not res.errors


def test_zero_usable_rows_is_one_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": turn("<image> q", "a")}]))
    with pytest.raises(ValueError, match=r"no usable rows \(1 skipped; first: line 1: image file not found"):
        check_usable(read_dataset(bad))
    cmd = [sys.executable, "-m", "mmdiff", "train", "--data", str(bad), "--init", str(tiny_model_dir),
           "--out", str(tmp_path / "o"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no usable rows" in r.stderr.strip().splitlines()[-1]
    good = llava_file(tmp_path / "g")
    r = subprocess.run(cmd[:5] + [str(good), "--init", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--init" in r.stderr and "not a model directory" in r.stderr
    assert not (tmp_path / "o").exists()


def config(tmp_path: Path, data: Path, init: Path, **kw) -> FinetuneConfig:
    base = dict(data=str(data), init=str(init), out=str(tmp_path / "out"), steps=4, batch_size=4, warmup=1,
                replay=0.0, eval_every=0, save_every=2, val_rows=2, threads=1)
    return FinetuneConfig(**{**base, **kw})


def test_multi_turn_items_have_history_and_answer_only_targets(tmp_path, tiny_model_dir):
    img = image(tmp_path / "images" / "0.png")
    (tmp_path / "c.json").write_text(json.dumps([{"id": "c", "image": img, "conversations":
                                                  turn("<image>\nwhat shape?", "star") + turn("is it red?", "no")}] * 1
                                                 + [{"id": f"s{i}", "image": img, "conversations": turn("q?", "a")}
                                                    for i in range(30)]))
    ft = FineTuner(config(tmp_path, tmp_path / "c.json", tiny_model_dir, val_rows=0), resume=False, progress=False)
    tok = ft.model.tokenizer
    first, second = [it for it in ft.train_items + ft.val_items if it.answers[0] in ("star", "no")]
    assert tok.decode(second.prompt).count("star") == 1 and "star" not in tok.decode(first.prompt)
    assert tok.decode(second.prompt).index("what shape?") < tok.decode(second.prompt).index("is it red?")
    response, mask = ft._response([first, second], 8, eos_fill=True)
    eos = ft.model.special.eos
    for it, row in zip((first, second), response.tolist()):
        n = len(it.answer)
        assert row[:n] == list(it.answer) and set(row[n:]) == {eos}  # the answer, then EOS: no prompt token
    assert mask.all()  # diffusion: the EOS fill is part of the answer canvas; AR masks it
    _, ar_mask = ft._response([first], 8, eos_fill=False)
    assert ar_mask[0].tolist() == [True] * (len(first.answer) + 1) + [False] * (7 - len(first.answer))


def test_finetune_output_works_with_ask_and_eval_and_learns_a_new_word(tmp_path, tiny_model_dir):
    data = llava_file(tmp_path, n=12, answer="magenta")
    cfg = config(tmp_path, data, tiny_model_dir, steps=150, lr=1e-2, eval_every=50, batch_size=8)
    val = FineTuner(cfg, resume=False, progress=False).run()
    assert val["overall"] == 1.0  # the word was never in the tiny tokenizer's corpus: byte-level pieces
    out = Path(cfg.out)
    assert json.loads((out / "finetune.json").read_text())["best_step"] in (50, 100, 150)
    r = subprocess.run([sys.executable, "-m", "mmdiff", "ask", "--model", str(out), "--image",
                        str(tmp_path / "images" / "0.png"), "what colour is it?"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "magenta"
    r = subprocess.run([sys.executable, "-m", "mmdiff", "eval", "--model", str(out), "--data", str(data), "--out",
                        str(tmp_path / "eval")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["accuracy"] == 1.0 and set(metrics["by_type"]) == {"colour"}


def interrupted_at_step_3(cfg: FinetuneConfig, monkeypatch) -> Path:
    """Run ``cfg`` until an interrupt at step 3 (the state of 2 steps is saved); returns its train-state dir."""
    real = FineTuner._loss

    def stop_at_3(self, step, rng):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, rng)

    with monkeypatch.context() as m:
        m.setattr(FineTuner, "_loss", stop_at_3)
        with pytest.raises(KeyboardInterrupt):
            FineTuner(cfg, resume=False, progress=False).run()
    state = Path(cfg.out).with_name(Path(cfg.out).name + ".train_state")
    assert json.loads((state / STATE_NAME).read_text())["step"] == 2
    return state


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    data = llava_file(tmp_path, n=8, answer="teal")
    whole = config(tmp_path / "a", data, tiny_model_dir, replay=0.25, replay_scenes=8)
    FineTuner(whole, resume=False, progress=False).run()
    cut = config(tmp_path / "b", data, tiny_model_dir, replay=0.25, replay_scenes=8)
    state = interrupted_at_step_3(cut, monkeypatch)
    FineTuner(cut, resume=True, progress=False).run()
    a = MultimodalDiffusionLM.from_pretrained(tmp_path / "a" / "out.train_state").state_dict()
    b = MultimodalDiffusionLM.from_pretrained(state).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_and_merges(tmp_path, tiny_model_dir):
    data = llava_file(tmp_path, n=8)
    cfg = config(tmp_path, data, tiny_model_dir, train=["lora"], lr=1e-2)
    ft = FineTuner(cfg, resume=False, progress=False)
    ft.run()
    out = MultimodalDiffusionLM.from_pretrained(cfg.out).state_dict()
    init = MultimodalDiffusionLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(out) == set(init)  # merged: a plain model directory
    changed = [k for k in init if not torch.equal(init[k], out[k])]
    assert changed and all(k.startswith("decoder.") and k.endswith("proj.weight") for k in changed)


def test_bad_train_part_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown part 'wings'"):
        FineTuner(config(tmp_path, llava_file(tmp_path), tiny_model_dir, train=["wings"]), resume=False)


def test_train_adapter_on_an_mmdiff_model_writes_a_model_directory(tmp_path, tiny_model_dir):
    img = image(tmp_path / "images" / "0.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": str(i), "image": img, "question": "what is it?",
                                                          "answers": ["red"], "type": "colour"}) + "\n" for i in range(4)))
    before = (tiny_model_dir / "model.safetensors").read_bytes()
    out = tmp_path / "adapter"
    r = subprocess.run([sys.executable, "-m", "mmdiff", "train-adapter", "--base", str(tiny_model_dir), "--data",
                        str(tmp_path / "d.jsonl"), "--modality", "image", "--out", str(out), "--steps", "2",
                        "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tiny_model_dir / "model.safetensors").read_bytes() == before  # the base is never written
    r = subprocess.run([sys.executable, "-m", "mmdiff", "ask", "--model", str(out), "--image",
                        str(tmp_path / img), "what is it?"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_original_split_accuracy_has_every_family(tiny_model_dir):
    from mmdiff.training.finetune import ORIGINAL_TYPES, original_accuracy

    acc = original_accuracy(tiny_model_dir, per_type=2)
    assert set(acc) == {*ORIGINAL_TYPES, "typed"} and all(0 <= v <= 1 for v in acc.values())


def test_vqav2_style_parquet_with_image_bytes_and_answer_dicts(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(buf, format="PNG")
    table = pa.table({"image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"not a png", "path": None}],
                      "question": ["what colour?", "what colour?"], "question_type": ["colour", "colour"],
                      "answers": [[{"answer": "green", "answer_id": 1}], [{"answer": "red", "answer_id": 1}]]})
    pq.write_table(table, tmp_path / "v.parquet")
    res = read_dataset(tmp_path / "v.parquet")
    [c] = res.conversations
    assert c.turns[0].answers == ["green"] and c.turns[0].type == "colour" and c.image.size == (64, 64)
    assert len(res.errors) == 1 and "unreadable image" in res.errors[0].reason


@pytest.mark.parametrize("extra, message", [
    (["--steps", "-1"], "--steps -1: must be at least 0"),
    (["--steps", "0", "--ar-steps", "0"], "--steps 0 and --ar-steps 0: nothing to train; give at least one step"),
    (["--ar-steps", "-3"], "--ar-steps -3: must be at least 0"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--replay", "1.5"], "--replay 1.5: must be a share in [0, 1) (0 = off)"),
    (["--train", "lora", "--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--replay-spoken", "1.5"], "--replay-spoken 1.5: must be a share in [0, 1] (0 = off)"),
    (["--replay-clips", "0"], "--replay-clips 0: must be at least 1"),
    (["--train", "wings"], "--train: unknown part 'wings'"),
    (["--also-eval", "0"], "--also-eval 0: must be at least 1 question per type"),
    (["--val", "VAL_MISSING"], "--val: dataset file not found:"),
    (["--data", "VAL_MISSING"], "--data: dataset file not found:"),
    (["--format", "hf"], "format hf reads a folder or a .parquet, .arrow, .csv file, not .json"),
    (["--format", "xx"], "argument --format: invalid choice: 'xx'"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--out", "OUT_IS_FILE"], "--out"),
])
def test_every_finetune_flag_refuses_a_bad_value_in_one_line(tmp_path, tiny_model_dir, capsys, extra, message):
    """Each fine-tune flag's bad value: exit 2, one line naming it, nothing written."""
    from mmdiff import cli

    (tmp_path / "file").write_text("x")
    swap = {"VAL_MISSING": str(tmp_path / "nope.json"), "OUT_IS_FILE": str(tmp_path / "file")}
    argv = ["train", "--data", str(llava_file(tmp_path / "g")), "--init", str(tiny_model_dir),
            "--out", str(tmp_path / "o"), "--no-progress", *[swap.get(a, a) for a in extra]]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (type, choices)
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " INFO " not in line
           and "random init" not in line]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.train_state").exists()


# ------------------------------------------------------------------------------------------------
# train-adapter reads every format; LoRA resumes; spoken replay
# ------------------------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """``mmdiff ARGV`` in this process: its exit status, and its stdout / stderr lines (log lines dropped)."""
    from mmdiff import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    keep = [line for line in err.splitlines() if line.strip() and " INFO " not in line and "random init" not in line]
    return rc, out.splitlines(), keep


def parquet_file(tmp_path: Path, n: int = 4) -> Path:
    import datasets

    paths = [str(tmp_path / image(tmp_path / "images" / f"p{i}.png", colour=(30 * i, 200, 0))) for i in range(n)]
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"image": paths + [str(tmp_path / "images" / "missing.png")],
                                "question": ["what colour is it?"] * (n + 1), "answer": ["green"] * (n + 1),
                                "type": ["colour"] * (n + 1)}).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["llava", "hf"])
def test_train_adapter_reads_every_format_and_counts_bad_rows(tmp_path, tiny_model_dir, capsys, fmt):
    """train-adapter reads what ``mmdiff train --data`` reads; a bad record is skipped and counted; the output loads."""
    import mmdiff

    if fmt == "llava":
        data = llava_file(tmp_path, n=4)
        recs = json.loads(data.read_text()) + [{"id": "bad", "image": "images/missing.png",
                                                "conversations": turn("<image>\nwhat colour is it?", "red")}]
        data.write_text(json.dumps(recs))
    else:
        data = parquet_file(tmp_path)
    out = tmp_path / "adapter"
    rc, stdout, err = run_cli(["train-adapter", "--base", tiny_model_dir, "--data", data, "--modality", "image",
                               "--out", out, "--steps", "2", "--batch-size", "2"], capsys)
    assert rc == 0, err
    assert any(f"({fmt}): 4 usable records (4 questions), 1 skipped" in line for line in stdout), stdout
    assert any("image file not found" in line for line in stdout)
    model = mmdiff.load(out)  # a whole model directory: ask / eval / demo load it unchanged
    [res] = model.generate(["what colour is it?"], images=[tmp_path / "images" / ("0.png" if fmt == "llava" else "p0.png")])
    assert isinstance(res.text, str)


def test_train_adapter_with_no_usable_row_stops_before_the_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from mmdiff.training import adapters

    def no_load(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(adapters, "load", no_load)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": turn("<image> q", "a")}]))
    rc, _, err = run_cli(["train-adapter", "--base", tiny_model_dir, "--data", bad, "--modality", "image",
                          "--out", tmp_path / "o", "--steps", "2"], capsys)
    assert rc == 2 and len(err) == 1 and "--data" in err[0], err
    assert "no usable rows (1 skipped; first: line 1: image file not found" in err[0]
    assert not (tmp_path / "o").exists()


def test_lora_resume_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    """A LoRA run stopped after 2 steps and resumed ends with the same adapters and merged model as one run."""
    from safetensors.torch import load_file

    from mmdiff.training.lora import LORA_NAME

    data = llava_file(tmp_path, n=8, answer="teal")
    whole = config(tmp_path / "a", data, tiny_model_dir, train=["lora"], lr=1e-2)
    FineTuner(whole, resume=False, progress=False).run()
    cut = config(tmp_path / "b", data, tiny_model_dir, train=["lora"], lr=1e-2)
    state = interrupted_at_step_3(cut, monkeypatch)
    init = MultimodalDiffusionLM.from_pretrained(tiny_model_dir).state_dict()
    base = MultimodalDiffusionLM.from_pretrained(state).state_dict()  # the un-merged base: a plain model
    assert all(torch.equal(init[k], base[k]) for k in init)  # --train lora: only the adapters learn
    assert load_file(state / LORA_NAME) and (state / "optimizer.safetensors").is_file()
    FineTuner(cut, resume=True, progress=False).run()
    a, b = load_file(tmp_path / "a" / "out.train_state" / LORA_NAME), load_file(state / LORA_NAME)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    a = MultimodalDiffusionLM.from_pretrained(tmp_path / "a" / "out").state_dict()
    b = MultimodalDiffusionLM.from_pretrained(tmp_path / "b" / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # merged: it learnt


@pytest.fixture(scope="module")
def audio_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny image model with a tiny speech path (Whisper-style encoder, semantic adapter)."""
    from mmdiff import decoder
    from mmdiff.adapters import ProjectorConfig, SemanticAdapterConfig
    from mmdiff.encoders import vision
    from mmdiff.encoders.audio import AudioEncoderConfig
    from mmdiff.model import ModelConfig

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = vision.preset("tiny-test")
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="linear", in_dim=vis.embed_dim, out_dim=dec.d_model),
                      audio=AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                               encoder_ffn_dim=64, max_source_positions=500, max_seconds=10.0),
                      audio_adapter=SemanticAdapterConfig(kind="audio_semantic", in_dim=32, out_dim=dec.d_model))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-audio-model")
    MultimodalDiffusionLM(cfg, tiny_tokenizer).save_pretrained(path)
    return path


@pytest.mark.needs_espeak
def test_replay_speaks_a_share_of_its_questions_when_the_model_hears(tmp_path, audio_model_dir, monkeypatch):
    """Image-only data, a model with a speech path: replayed questions are spoken (spoken VQA and ASR) and
    reach the decoder through the speech path, which the answer loss leaves as it was (the recipe's way)."""
    import random

    data = llava_file(tmp_path, n=8)
    cfg = config(tmp_path, data, audio_model_dir, replay=0.5, replay_scenes=8, replay_spoken=1.0, replay_clips=4,
                 steps=2, lr=1e-2)
    ft = FineTuner(cfg, resume=False, progress=False)
    assert ft.speech is not None and len(ft.speech) == 4 and ft.speech.features is not None  # frozen encoder: cached
    items = ft._replay_items(random.Random(0), 20)
    assert all(it.clip >= 0 for it in items) and {it.type == "asr" for it in items} == {True, False}
    embeds, valid = ft._embed(items[:2])
    assert embeds.shape[1] > max(len(it.prompt) for it in items[:2])  # the clips' tokens are in the prompt
    heard = []
    real = ft._replay_audio
    monkeypatch.setattr(ft, "_replay_audio", lambda clips: heard.append(len(clips)) or real(clips))
    before = {k: v.clone() for k, v in ft.model.audio_adapter.state_dict().items()}
    decoder = {k: v.clone() for k, v in ft.model.decoder.state_dict().items()}
    ft.run()
    assert heard and sum(heard) >= 2 * 2  # two spoken items in each of the two steps' batches
    after = MultimodalDiffusionLM.from_pretrained(cfg.out)
    assert all(torch.equal(before[k], v) for k, v in after.audio_adapter.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in after.decoder.state_dict().items())


def test_spoken_replay_is_off_without_a_synthesiser_or_a_speech_path(tmp_path, audio_model_dir, tiny_model_dir,
                                                                     monkeypatch, capsys):
    from mmdiff.data.speech import NO_SYNTHESISER
    from mmdiff.training import finetune

    data = llava_file(tmp_path, n=8)
    ft = FineTuner(config(tmp_path, data, tiny_model_dir, replay=0.5, replay_scenes=4), resume=False, progress=False)
    out = capsys.readouterr().out
    assert ft.speech is None and "no spoken questions" not in out and "of it spoken" not in out  # nothing to rehearse
    monkeypatch.setattr(finetune, "espeak_available", lambda: False)
    ft = FineTuner(config(tmp_path, data, audio_model_dir, replay=0.5, replay_scenes=4), resume=False, progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if NO_SYNTHESISER in line]
    assert ft.speech is None and len(lines) == 1 and lines[0].startswith("replay: no spoken questions")


def test_warmup_cosine_schedule_matches_its_formula():
    """One schedule for the recipe and the fine-tune: linear warmup, then cosine from the peak to floor * peak."""
    from mmdiff.training.state import warmup_cosine

    peak, warmup, total, floor = 2e-3, 10, 110, 0.1
    assert warmup_cosine(0, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak / 10)
    assert warmup_cosine(9, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak)
    assert warmup_cosine(10, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak)
    assert warmup_cosine(60, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert warmup_cosine(110, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak * floor)
    assert warmup_cosine(500, peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak * floor)
