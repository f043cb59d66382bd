"""Every door on every checkpoint fixture: ``mmdiff ask``, ``mmdiff eval``, ``caption``, the demo
(through ``gradio_client``), the server and the lmms-eval plugin load each directory of
``tests/fixtures`` (``fixture_dir`` in conftest: a new family's fixture is picked up here by itself)
and answer with the media the model takes (an image with a vision encoder, a clip with an audio
encoder, text otherwise); a medium the model cannot take is refused in one line (exit 2). Prompts are
the released ones: the family's chat template with LLaVA's ``<image>\\n`` layout.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, media_for

from mmdiff import cli
from mmdiff.loading import load, media_of, resolve_dtype
from mmdiff.model import NO_HEARING, NO_VISION
from mmdiff.sampling import DecodeConfig, SamplerConfig

QUESTION = "what is in the picture?"
#: a short canvas: the door tests check wiring, not answers
FAST = ["--gen-length", "4", "--steps", "2"]


def ask_argv(model_dir: Path, media: dict, *extra: str) -> list[str]:
    argv = ["ask", QUESTION, "--model", str(model_dir), *FAST, *extra]
    for kind in ("image", "audio"):
        if media[kind] is not None:
            argv += [f"--{kind}", str(media[kind])]
    return argv


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------------------
# the doors run end to end
# ------------------------------------------------------------------------------------------------
def test_ask_answers(fixture_dir, fixture_model, media_files, capsys):
    media = media_for(fixture_model, media_files)
    assert cli.main(ask_argv(fixture_dir, media, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and out["nfe"] == 2


def test_ask_answers_in_bfloat16_and_refuses_a_missing_device(fixture_dir, fixture_model, media_files, capsys):
    media = media_for(fixture_model, media_files)
    assert cli.main(ask_argv(fixture_dir, media, "--dtype", "bfloat16")) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli.main(ask_argv(fixture_dir, media, "--device", "cuda")) == 2
        assert "--device cuda: not available on this machine" in one_line_error(capsys)


def test_eval_answers_a_jsonl(fixture_dir, fixture_model, media_files, tmp_path, capsys):
    media = media_for(fixture_model, media_files)
    data = tmp_path / "data"
    data.mkdir()
    row = {k: shutil.copy(v, data / v.name) and v.name for k, v in media.items() if v is not None}
    rows = [{"id": f"r{i}", "question": q, "answers": ["yes"], "type": "yesno", **row}
            for i, q in enumerate([QUESTION, "is it day?"])]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli.main(["eval", "--data", str(data / "data.jsonl"), "--out", str(out), "--model", str(fixture_dir),
                     "--quiet", "--device", "cpu", "--steps", "2"]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["r0", "r1"] and all(isinstance(p["prediction"], str) for p in predictions)
    assert json.loads((out / "metrics.json").read_text())["errors"] == 0
    assert "rows 2  errors 0" in capsys.readouterr().out


def test_demo_answers_through_gradio_client(fixture_dir, fixture_model, media_files):
    gradio_client = pytest.importorskip("gradio_client")
    from mmdiff.commands.demo import load_demo_app

    app_module = load_demo_app()
    app = app_module.build_app(str(fixture_dir), frame_delay=0.0)
    url = app_module.serve(app, port=free_port(), block=False)
    client = gradio_client.Client(url, verbose=False)
    try:
        media = media_for(fixture_model, media_files)
        handle = gradio_client.handle_file
        settings = [4 if o.key == "gen_length" else v
                    for o, v in zip(app_module.panel_options(), panel_values(app_module))]
        _, answer, _, stats = client.predict(media["image"] and handle(str(media["image"])), QUESTION,
                                             media["audio"] and handle(str(media["audio"])), *settings, api_name="/ask")
        assert isinstance(answer, str) and "**NFE**" in stats
        if fixture_model.vision is None:  # the page refuses an image as mmdiff ask does
            with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(NO_VISION)):
                client.predict(handle(str(media_files["image"])), QUESTION, None, *settings, api_name="/ask")
    finally:
        client.close()
        app.close()


def panel_values(app_module) -> list:
    """The Ask tab's settings panel at its defaults, as the page sends them."""
    values = app_module.ASK_DEFAULTS.values()
    out = []
    for opt in app_module.panel_options():
        v = values[opt.key]
        out.append((list(v) if opt.choices else ",".join(map(str, v))) if opt.many else (0 if v is None else v))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_a_chat_completion(fixture_dir, fixture_model, media_files):
    openai = pytest.importorskip("openai")
    from test_serve import data_url, running, user

    from mmdiff.serving.engine import Engine
    from mmdiff.serving.server import build_app

    engine = Engine(fixture_model, max_batch=2, max_queue=2)
    media = media_for(fixture_model, media_files)
    message = user(QUESTION, data_url(media["image"].read_bytes()) if media["image"] else None,
                   audio=media["audio"].read_bytes() if media["audio"] else None)
    try:
        with running(build_app(engine, model_name="fixture")) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
            reply = client.chat.completions.create(model="fixture", messages=[message], extra_body={"gen_length": 4})
            assert isinstance(reply.choices[0].message.content, str)
    finally:
        engine.stop()


def test_lmms_eval_plugin_loads_and_answers(fixture_dir, fixture_model, media_files):
    from PIL import Image
    from test_lmms_eval_plugin import FakeInstance

    from mmdiff.evaluation import lmms_eval_plugin as plugin

    lmm = plugin.MMDiffLMMS(pretrained=str(fixture_dir), device="cpu", gen_length=4, steps=2)
    media = media_for(fixture_model, media_files)
    doc = {"image": Image.open(media_files["image"]).convert("RGB")}
    lmm.task_dict = {"t": {"test": {0: doc}}}
    visual = (lambda d: [d["image"]]) if media["image"] is not None else (lambda d: [])
    [answer] = lmm.generate_until([FakeInstance((QUESTION, {"until": []}, visual, 0, "t", "test"))])
    assert isinstance(answer, str)
    if fixture_model.vision is None:  # an image task on a text-only model stops, it does not score ""
        with pytest.raises(ValueError, match=re.escape(NO_VISION)):
            lmm.generate_until([FakeInstance((QUESTION, {}, lambda d: [d["image"]], 0, "t", "test"))])


def test_caption_works_or_refuses_in_one_line(fixture_dir, fixture_model, media_files, capsys):
    argv = ["caption", "--model", str(fixture_dir), "--image", str(media_files["image"]), "--steps", "2"]
    rc = cli.main(argv)
    if fixture_model.vision is None:
        assert rc == 2 and one_line_error(capsys) == f"mmdiff caption: error: {NO_VISION}"
        return
    if rc == 2:  # the scene template may not fit a tiny model's context: said in one line, before decoding
        assert "more than the model's context" in one_line_error(capsys)
        return
    assert rc == 0
    json.loads(capsys.readouterr().out)  # schema-valid JSON from the structure prior, even untrained


def test_a_small_schema_caption_is_valid_json_on_every_vision_family(fixture_dir, fixture_model, media_files,
                                                                     tmp_path, capsys):
    """Structure priors on a released model: the JSON always validates, whatever the tokenizer."""
    if fixture_model.vision is None:
        pytest.skip(f"{fixture_dir.name} reads no images")
    from mmdiff.sampling.schema import validate

    schema = {"type": "object", "required": ["n", "red"], "properties": {  # small: a tiny tokenizer spells JSON
        "n": {"type": "integer"}, "red": {"type": "boolean"}}}               # out byte by byte, in 256 positions
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    assert cli.main(["caption", "--model", str(fixture_dir), "--image", str(media_files["image"]), "--schema",
                     str(tmp_path / "schema.json"), "--steps", "2"]) == 0
    validate(json.loads(capsys.readouterr().out), schema)


def test_search_answers_on_every_family(fixture_dir, fixture_model, media_files, capsys):
    """A search runs, or (M-RoPE models with an image: the verifiers' prompts carry no positions yet)
    is refused in one line."""
    media = media_for(fixture_model, media_files)
    code = cli.main(ask_argv(fixture_dir, media, "--search", "best_of_n", "--candidates", "2", "--json"))
    out = capsys.readouterr()
    if fixture_model.cfg.decoder.mrope_section and media["image"] is not None:
        assert code == 2 and out.err.strip().count("\n") == 0 and "not supported for M-RoPE models" in out.err
        return
    assert code == 0
    assert len(json.loads(out.out)["candidates"]) >= 1


# ------------------------------------------------------------------------------------------------
# refusals: a medium the model cannot take, one line, exit 2
# ------------------------------------------------------------------------------------------------
def test_a_medium_the_model_lacks_is_refused_in_one_line(fixture_dir, fixture_model, media_files, capsys):
    cases = []
    if fixture_model.vision is None:
        cases.append((["--image", str(media_files["image"])], NO_VISION))
    if fixture_model.audio is None:
        cases.append((["--audio", str(media_files["audio"])], NO_HEARING))
    if fixture_model.vision is not None:  # a vision model's question needs its image
        cases.append(([], "no image"))
    for flags, message in cases:
        assert cli.main(["ask", QUESTION, "--model", str(fixture_dir), *FAST, *flags]) == 2
        line = one_line_error(capsys)
        assert line.startswith("mmdiff ask: error: ") and message in line


def test_the_config_says_what_a_model_reads_and_ask_refuses_before_loading(fixture_dir, fixture_model, media_files,
                                                                          monkeypatch, capsys):
    """media_of(config.json) agrees with the loaded model's encoders (MMaDA's tokenizer ships in vq_model/),
    and a medium the model cannot read is refused before mmdiff.load runs (a 7-8B load takes minutes)."""
    import mmdiff.loading

    assert set(media_of(fixture_dir)) == {m for m, enc in (("image", fixture_model.vision),
                                                          ("audio", fixture_model.audio)) if enc is not None}
    monkeypatch.setattr(mmdiff.loading, "load", lambda *a, **k: pytest.fail("loaded before refusing"))
    for flag, medium, message in (("--image", "image", NO_VISION), ("--audio", "audio", NO_HEARING)):
        if medium not in media_of(fixture_dir):
            assert cli.main(["ask", QUESTION, "--model", str(fixture_dir), *FAST, flag, str(media_files[medium])]) == 2
            assert one_line_error(capsys) == f"mmdiff ask: error: {message}"


def test_generate_refuses_a_medium_the_model_lacks(fixture_model, media_files):
    from mmdiff.search import answer

    if fixture_model.vision is None:
        with pytest.raises(ValueError, match=re.escape(NO_VISION)):
            answer(fixture_model, [QUESTION], images=[media_files["image"]], audios=[None], decode=DecodeConfig())
    if fixture_model.audio is None:
        with pytest.raises(ValueError, match=re.escape(NO_HEARING)):
            answer(fixture_model, [QUESTION], images=[None], audios=[media_files["audio"]], decode=DecodeConfig())


# ------------------------------------------------------------------------------------------------
# prompts: the family's released chat template
# ------------------------------------------------------------------------------------------------
#: the released prompt of each text family for QUESTION, as its tokenizer's chat template writes it
RELEASED_PROMPTS = {
    "llada-tiny": ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + QUESTION
                   + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "dream-tiny": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + QUESTION
                   + "<|im_end|>\n<|im_start|>assistant\n"),
}


def test_the_prompt_is_the_tokenizers_chat_template(fixture_dir, fixture_model):
    """format_prompt == the checkpoint tokenizer's own apply_chat_template, media placed as LLaVA does
    (``<image>\\n`` before the question) after the family's system prompt."""
    tok = fixture_model.tokenizer
    hf = getattr(tok, "tokenizer", None)
    if hf is None or hf.chat_template is None:
        pytest.skip(f"{fixture_dir.name}: mmdiff's own prompt format (tests/test_tokenizer.py)")
    n_images = int(fixture_model.vision is not None)
    before_chat = getattr(tok, "media_layout", "llava") == "before_chat"  # MMaDA: the image block, then the chat
    media_format = getattr(tok, "media_format", "{}\n")  # LLaVA's "<image>\n"; Dimple's vision start/end
    content = ("" if before_chat else media_format.format("<image>") * n_images) + QUESTION
    system = getattr(tok, "system", None)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": content}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if before_chat:
        text = "<image>" * n_images + text
    ids = fixture_model.format_prompt(QUESTION, n_images=n_images)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids.count(fixture_model.special.image) == n_images
    if fixture_dir.name in RELEASED_PROMPTS:
        assert text == RELEASED_PROMPTS[fixture_dir.name]


def test_task_prompts_keep_the_released_template(fixture_model, media_files):
    """Captions, the count question and the search's verifier all go through format_prompt: the
    released template wraps them too (no mmdiff-only format for released models)."""
    from mmdiff.tasks.prompts import CAPTION_JSON_QUESTION, verification_question

    for q in (CAPTION_JSON_QUESTION, verification_question("is it red?", "yes")):
        text = fixture_model.tokenizer.decode(fixture_model.format_prompt(q))
        assert q in text and text != q


# ------------------------------------------------------------------------------------------------
# dtype resolution: one rule everywhere
# ------------------------------------------------------------------------------------------------
def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_own_on_gpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") is None  # the checkpoint's own (bfloat16 for released 8B models)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype(None, "cpu") is None
    with pytest.raises(ValueError, match="--dtype 'int8': choose one of auto, float32, bfloat16, float16"):
        resolve_dtype("int8", "cpu")


def test_a_bfloat16_checkpoint_loads_in_float32_on_cpu_unless_asked(tmp_path):
    src = FIXTURES / "llada-tiny"
    dst = tmp_path / "bf16"
    assert cli.main(["convert", str(src), str(dst), "--dtype", "bfloat16"]) == 0
    assert {p.dtype for p in load(dst).parameters()} == {torch.float32}
    assert {p.dtype for p in load(dst, dtype=None).parameters()} == {torch.bfloat16}
    out = load(dst).generate(["hi"], decode=DecodeConfig(sampler=SamplerConfig(gen_length=4, steps=2)))
    assert isinstance(out[0].text, str)
