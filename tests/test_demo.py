"""The Gradio demo, served in-process and driven through ``gradio_client`` like a remote user.

A tiny random model (vision + audio) checks the wiring end to end: the page's answer must equal
the library's on the same input (``model.generate``, with pruning settings too; ``search`` with a
search setting; ``caption`` with the structure prior), and a bad input must get the page the same
one-line message as ``mmdiff ask``. The shipped model's test checks real answers (a 16-bit PNG too)
and what it heard.
"""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmdiff import cli
from mmdiff.adapters import ProjectorConfig, SemanticAdapterConfig
from mmdiff.commands.demo import load_demo_app
from mmdiff.data.dataset import iter_examples
from mmdiff.data.scenes import scene_schema
from mmdiff.decoder import preset as decoder_preset
from mmdiff.encoders import AudioEncoderConfig
from mmdiff.encoders.vision import preset as vision_preset
from mmdiff.model import NO_IMAGE, ModelConfig, MultimodalDiffusionLM
from mmdiff.sampling import DecodeConfig, SamplerConfig, SearchConfig
from mmdiff.sampling.pruning import PruningConfig
from mmdiff.sampling.schema import validate
from mmdiff.search import search
from mmdiff.tasks.captioning import caption

gradio_client = pytest.importorskip("gradio_client")
app_module = load_demo_app()

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "mmdiff-tiny"
QUESTION = "how many red circles are there?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tone(path: Path, *, amplitude: float = 0.3, seconds: float = 1.0) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (amplitude * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    return path


def make_tiny_model_dir(root: Path, tokenizer) -> Path:
    """A random vision + audio model saved with one typed and one spoken example."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        decoder=decoder_preset("tiny-test", vocab_size=len(tokenizer)),
        vision=vision_preset("tiny-test"),
        vision_adapter=ProjectorConfig(kind="linear", in_dim=32, out_dim=32),
        audio=AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                 max_source_positions=150, max_seconds=3.0),
        audio_adapter=SemanticAdapterConfig(kind="audio_semantic", in_dim=32, out_dim=32),
    )
    model_dir = root / "model"
    MultimodalDiffusionLM(cfg, tokenizer).save_pretrained(model_dir)
    ex = model_dir / "examples"
    (ex / "images").mkdir(parents=True)
    (ex / "audio").mkdir()
    _, image, _ = next(iter_examples("test", 0))
    image.save(ex / "images" / "scene.png")
    tone(ex / "audio" / "question.wav")
    examples = [{"image": "images/scene.png", "question": QUESTION, "audio": None, "answer": "1"},
                {"image": "images/scene.png", "question": "where is the blue square?", "audio": "audio/question.wav",
                 "answer": "top left"}]
    (ex / "examples.json").write_text(json.dumps({"sampler": SamplerConfig(gen_length=8).to_dict(),
                                                  "examples": examples}))
    return model_dir


def settings(config: SamplerConfig = app_module.ASK_DEFAULTS.sampler, cache: str = "none", *,
             pruning: PruningConfig = PruningConfig(), search: SearchConfig | None = SearchConfig()) -> list:
    """The settings panel's values, in the panel's order (0 = the sampler default; lists of numbers
    as "3,4"); ``search=None``: the caption tab's panel, which has no search controls."""
    values = DecodeConfig(config, cache, pruning, search or SearchConfig()).values()

    def shown(opt):
        v = values[opt.key]
        if opt.many:
            return list(v) if opt.choices else ",".join(map(str, v))
        return 0 if v is None else v

    return [shown(o) for o in app_module.panel_options(search=search is not None)]


PANEL = [o.key for o in app_module.panel_options()]


class Served:
    """A demo app launched on a free local port, with a client."""

    def __init__(self, model_dir: Path) -> None:
        self.app = app_module.build_app(str(model_dir), frame_delay=0.0)
        self.url = app_module.serve(self.app, port=free_port(), block=False)
        self.client = gradio_client.Client(self.url, verbose=False)

    def ask(self, image: str | Path | None, question: str, audio: str | Path | None = None,
            config: SamplerConfig = app_module.ASK_DEFAULTS.sampler, **panel) -> tuple[str, str, str, str]:
        """(canvas, answer, heard, stats) of the Ask tab."""
        handle = gradio_client.handle_file
        return self.client.predict(image and handle(str(image)), question, audio and handle(str(audio)),
                                   *settings(config, **panel), api_name="/ask")

    def caption(self, image: str | Path | None, structure: str, config: SamplerConfig, **panel) -> list[tuple]:
        """Every output the caption tab streamed, the final one last."""
        job = self.client.submit(image and gradio_client.handle_file(str(image)), structure,
                                 *settings(config, search=None, **panel), api_name="/caption")
        job.result()
        return job.outputs()

    def close(self) -> None:
        self.client.close()
        self.app.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("demo"), tiny_tokenizer)


@pytest.fixture(scope="module")
def served(model_dir):
    s = Served(model_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def model(model_dir) -> MultimodalDiffusionLM:
    return MultimodalDiffusionLM.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------------
# end to end through the client
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SamplerConfig(gen_length=8),
                                    SamplerConfig(gen_length=12, steps=6, block_length=4, transfer="threshold",
                                                  threshold=0.5)], ids=["defaults", "blocks-threshold"])
def test_ask_equals_generate(served, model, model_dir, config):
    image = model_dir / "examples" / "images" / "scene.png"
    canvas, answer, heard, stats = served.ask(image, QUESTION, config=config)
    expected = model.generate([QUESTION], images=[image], decode=DecodeConfig(sampler=config))[0]
    assert answer == expected.text and heard == ""
    assert f"**NFE** {expected.nfe}" in stats and "latency" in stats
    assert canvas.count('title="masked"') == 1  # every position filled: only the legend's ▢ is left
    assert canvas.count('title="fixed at step') == config.gen_length


def test_spoken_question_equals_generate(served, model, model_dir):
    image, clip = model_dir / "examples" / "images" / "scene.png", model_dir / "examples" / "audio" / "question.wav"
    _, answer, heard, _ = served.ask(image, "", clip)
    assert answer == model.generate([""], images=[image], audios=[clip], decode=app_module.ASK_DEFAULTS)[0].text
    assert heard == ""  # audio_semantic hands the decoder no transcript to show


def test_bad_inputs_get_messages_and_the_app_keeps_serving(served, model_dir, tmp_path):
    image = model_dir / "examples" / "images" / "scene.png"
    cases = [((image, "   ", None), app_module.NO_QUESTION)]
    for args, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
            served.ask(*args)
    zero_length = [0 if name == "gen_length" else v for name, v in zip(PANEL, settings())]
    with pytest.raises(gradio_client.exceptions.AppError, match="gen_length must be >= 1"):
        served.client.predict(None, QUESTION, None, *zero_length, api_name="/ask")
    assert served.ask(image, QUESTION)[1] is not None  # still serving


def bad_inputs(root: Path, image: Path) -> dict[str, tuple[Path | None, str, Path | None]]:
    """Inputs every entry point must refuse with one line: name -> (image, question, audio)."""
    (root / "notes.png").write_text("this is a text file, not a picture")
    Image.new("1", (15000, 15000)).save(root / "bomb.png")
    tone(root / "question.wav")
    return {"not an image": (root / "notes.png", QUESTION, None),
            "silent clip": (image, "", tone(root / "silence.wav", amplitude=0.0)),
            "no image": (None, QUESTION, None),
            "spoken, no image": (None, "", root / "question.wav"),
            "bomb": (root / "bomb.png", QUESTION, None),
            "not UTF-8": (image, "\udcff\udcfe", None),  # what the command line makes of the bytes ff fe
            "control character": (image, "how many\x1b[2J?", None),
            "too long": (image, "x" * 401, None)}


@pytest.mark.parametrize("case", ["not an image", "silent clip", "no image", "spoken, no image", "bomb", "not UTF-8",
                                  "control character", "too long"])
def test_a_bad_input_gets_the_same_line_in_the_page_as_on_the_command_line(served, model_dir, tmp_path, capsys, case):
    image, question, audio = bad_inputs(tmp_path, model_dir / "examples" / "images" / "scene.png")[case]
    argv = ["ask", question, "--model", str(model_dir)] + (["--image", str(image)] if image else []) + (
        ["--audio", str(audio)] if audio else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdiff ask: error: ") and err.count("\n") == 1, err
    message = err.removeprefix("mmdiff ask: error: ").strip()
    for path in (image, audio):  # the page names an upload by its own name, not by the server's copy
        message = message.replace(str(path), path.name) if path else message
    if case == "not UTF-8":
        return  # a page cannot send it: the browser and the HTTP JSON carry only valid Unicode
    with pytest.raises(gradio_client.exceptions.AppError) as page:
        served.ask(image, question, audio)
    assert message in str(page.value)
    if case in ("no image", "spoken, no image"):
        assert message == NO_IMAGE


def test_a_16_bit_png_upload_is_read_like_its_8_bit_original(served, model, model_dir, tmp_path):
    grey = Image.open(model_dir / "examples" / "images" / "scene.png").convert("L")
    grey.save(tmp_path / "grey8.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # mode I;16
    expected = model.generate([QUESTION], images=[tmp_path / "grey8.png"], decode=app_module.ASK_DEFAULTS)[0].text
    assert served.ask(tmp_path / "grey16.png", QUESTION)[1] == expected


def test_the_api_names_its_parameters_and_the_settings_may_be_left_out(served, model, model_dir):
    api = served.client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    ask, described = api["/ask"], api["/caption"]
    assert [p["parameter_name"] for p in ask["parameters"]] == ["image", "question", "audio", *PANEL]
    assert [p["parameter_name"] for p in described["parameters"]] == [
        "image", "structure", *(o.key for o in app_module.panel_options(search=False))]
    assert [r["label"] for r in ask["returns"]] == ["Denoising", "Answer", "Heard", "Cost"]
    assert [p["parameter_has_default"] for p in ask["parameters"]] == [False] * 3 + [True] * len(PANEL)
    image = model_dir / "examples" / "images" / "scene.png"
    _, answer, _, _ = served.client.predict(gradio_client.handle_file(str(image)), QUESTION, None, threshold=0.5,
                                            transfer="threshold", api_name="/ask")
    decode = app_module.ASK_DEFAULTS.replace(sampler=SamplerConfig(gen_length=8, transfer="threshold", threshold=0.5))
    assert answer == model.generate([QUESTION], images=[image], decode=decode)[0].text


def test_the_page_lists_what_the_model_understands(served):
    from mmdiff.data.questions import QUESTION_TYPES
    from mmdiff.data.scenes import COLOURS, POSITIONS, SHAPES, SIZES

    [guide] = [b for b in served.app.blocks.values() if getattr(b, "elem_id", None) == "world-guide"]
    for word in (*SHAPES, *COLOURS, *SIZES, *POSITIONS, *QUESTION_TYPES):
        assert word in guide.value
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in guide.value.splitlines()]
    examples = {row[0].split(" ")[0]: row[1] for row in rows if row[0].split(" ")[0] in QUESTION_TYPES}
    assert list(examples) == list(QUESTION_TYPES) and all(q.endswith((".", "?")) for q in examples.values())


def test_pruning_setting_equals_generate(served, model, model_dir):
    image = model_dir / "examples" / "images" / "scene.png"
    pruning = PruningConfig(prune="fastv", keep_ratio=0.5, prune_layer=1, skip_layers=(1,), skip_from_step=4)
    canvas, answer, _, stats = served.ask(image, QUESTION, pruning=pruning)
    expected = model.generate([QUESTION], images=[image], decode=app_module.ASK_DEFAULTS.replace(pruning=pruning))[0]
    assert answer == expected.text and f"**NFE** {expected.nfe}" in stats
    assert canvas.count('title="fixed at step') == app_module.ASK_DEFAULTS.sampler.gen_length
    _, skipped, _, _ = served.ask(image, QUESTION, pruning=PruningConfig(skip_layers=(1,)))  # 2 layers: K=2 unused
    assert skipped == model.generate([QUESTION], images=[image], decode=app_module.ASK_DEFAULTS.replace(pruning=PruningConfig(skip_layers=(1,))))[0].text


@pytest.mark.parametrize("config", [SearchConfig(strategy="best_of_n", candidates=2),
                                    SearchConfig(strategy="hierarchical", candidates=2, refine=1)],
                         ids=["best_of_n", "hierarchical"])
def test_search_setting_equals_search(served, model, model_dir, config):
    image = model_dir / "examples" / "images" / "scene.png"
    canvas, answer, _, stats = served.ask(image, QUESTION, search=config)
    expected = search(model, QUESTION, image=image, decode=app_module.ASK_DEFAULTS.replace(search=config))
    assert answer == expected.text
    assert f"**NFE** {expected.nfe}" in stats and "final answer only" in stats and config.strategy in stats
    plain = model.generate([QUESTION], images=[image], decode=app_module.ASK_DEFAULTS)[0]
    assert expected.nfe > plain.nfe
    assert canvas.count('title="chosen by the search') == len(expected.tokens)
    skipping = PruningConfig(skip_layers=(1,))  # search and layer skipping compose (one denoiser)
    _, answer, _, stats = served.ask(image, QUESTION, search=config, pruning=skipping)
    expected = search(model, QUESTION, image=image, decode=app_module.ASK_DEFAULTS.replace(search=config, pruning=skipping))
    assert answer == expected.text and f"**NFE** {expected.nfe}" in stats


def test_caption_with_structure_prior_streams_schema_valid_json(served, model, model_dir):
    image = model_dir / "examples" / "images" / "scene.png"
    cfg = app_module.CAPTION_DEFAULTS.sampler
    outputs = served.caption(image, "scene schema", cfg)
    canvas, status, parsed, raw = outputs[-1]
    validate(parsed, scene_schema())
    expected = caption(model, image, format="json", schema=scene_schema(), decode=DecodeConfig(sampler=cfg))
    assert parsed == expected.data and raw == expected.text
    assert status.startswith("✓ valid JSON") and f"**NFE** {expected.nfe}" in status
    assert f"count question: {expected.count}" in status
    frames = [o for o in outputs if o[1] == "denoising…"]
    assert len(frames) >= expected.nfe  # one frame per step of the count question and of the caption
    assert 'title="preset (structure prior)"' in canvas  # the template's fixed tokens


def test_caption_reports_parse_errors(served, model, model_dir):
    image = model_dir / "examples" / "images" / "scene.png"
    cfg = SamplerConfig(gen_length=16)
    _, status, parsed, raw = served.caption(image, "none", cfg)[-1]
    assert raw == model.generate([app_module.CAPTION_JSON_QUESTION], images=[image], decode=DecodeConfig(sampler=cfg))[0].text
    assert status.startswith("✗ not valid JSON: ") and parsed is None  # a random model writes no JSON
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(app_module.NO_IMAGE)):
        served.client.predict(None, "scene schema", *settings(cfg, search=None), api_name="/caption")


def test_concurrent_asks_share_the_engine_and_each_answers_as_generate_alone(model_dir, model):
    """Two users ask at once on the engine path: their answers advance in the same decoder forwards,
    each streams its own steps, and each equals ``model.generate`` alone; settings the engine does
    not batch (layer skipping) still answer, on their own run."""
    from mmdiff.serving.engine import Engine

    engine = Engine(MultimodalDiffusionLM.from_pretrained(model_dir), max_batch=4)  # started once both wait
    app = app_module.build_app(str(model_dir), frame_delay=0.0, engine=engine)
    url = app_module.serve(app, port=free_port(), block=False)
    client = gradio_client.Client(url, verbose=False)
    image = model_dir / "examples" / "images" / "scene.png"
    questions = [QUESTION, "where is the blue square?"]
    try:
        jobs = [client.submit(gradio_client.handle_file(str(image)), q, None, *settings(), api_name="/ask")
                for q in questions]
        for _ in range(600):
            if engine.load == (0, 2):
                break
            time.sleep(0.05)
        assert engine.load == (0, 2), "both requests should be waiting in the engine"
        engine.start()
        finals = [job.result(timeout=60) for job in jobs]
        frames = [[o for o in job.outputs() if o[3] == "denoising…"] for job in jobs]
        skipping = PruningConfig(skip_layers=(1,))
        _, skipped, _, _ = client.predict(gradio_client.handle_file(str(image)), QUESTION, None,
                                          *settings(pruning=skipping), api_name="/ask")
    finally:
        engine.stop()
        client.close()
        app.close()
    for q, (canvas, answer, _, stats), shown in zip(questions, finals, frames):
        expected = model.generate([q], images=[image], decode=app_module.ASK_DEFAULTS)[0]
        assert answer == expected.text and f"**NFE** {expected.nfe}" in stats
        assert canvas.count('title="fixed at step') == app_module.ASK_DEFAULTS.sampler.gen_length
        assert len(shown) == expected.nfe  # one frame per step event of the request
    assert engine.stats.rows == 2 * engine.stats.forwards  # every forward ran both requests
    assert skipped == model.generate([QUESTION], images=[image],
                                     decode=app_module.ASK_DEFAULTS.replace(pruning=skipping))[0].text


def test_demo_max_batch_needs_engine(capsys):
    assert cli.main(["demo", "--max-batch", "4"]) == 2
    assert "--max-batch 4: the engine's batch, a positive number, with --engine" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                    reason="no shipped model at checkpoints/mmdiff-tiny (make train)")
def test_shipped_model_answers_its_examples(tmp_path):
    """Typed examples, and a spoken one (held-out voice, decoded with the shipped ctc_lm.json beam)."""
    examples = [e for e in app_module.load_examples(SHIPPED) if e.audio is None]
    spoken = [e for e in app_module.load_examples(SHIPPED) if e.audio is not None]
    assert examples, "checkpoints/mmdiff-tiny/examples/examples.json has no typed examples (scripts/make_examples.py)"
    served = Served(SHIPPED)
    try:
        for ex in examples[:3]:
            assert served.ask(ex.image, ex.question)[1] == ex.answer, ex
        for ex in spoken[:1]:
            _, answer, heard, stats = served.ask(ex.image, "", ex.audio)
            assert answer == ex.answer and heard == MultimodalDiffusionLM.from_pretrained(SHIPPED).transcribe([ex.audio])[0]
        count = SHIPPED / "examples" / "images" / "test-0-000006.png"  # 3 objects
        grey = Image.open(count).convert("L")
        grey.save(tmp_path / "grey8.png")
        Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # mode I;16
        for image in (count, tmp_path / "grey8.png", tmp_path / "grey16.png"):
            assert served.ask(image, "how many objects are there?")[1] == "3", image
    finally:
        served.close()


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_settings_read_back_into_the_configs():
    from mmdiff.sampling.denoisers import CACHES

    names = PANEL
    pruning = PruningConfig(prune="divprune", keep_ratio=0.25, prune_layer=1, prune_from_step=2,
                            prune_schedule="progressive", skip_layers=(0, 3), skip_from_step=5)
    searched = SearchConfig(strategy="hierarchical", candidates=4, refine=2, verifier="yesno")
    values = settings(SamplerConfig(gen_length=32, steps=16, block_length=8, transfer="factor", factor=2.0), "dual",
                      pruning=pruning, search=searched)
    kept = [i for i, n in enumerate(names) if n != "seed"]  # a panel without a seed control keeps the base's
    chosen = app_module.read_settings([names[i] for i in kept], [values[i] for i in kept],
                                      base=DecodeConfig(SamplerConfig(seed=7)))
    assert chosen.sampler == SamplerConfig(gen_length=32, steps=16, block_length=8, transfer="factor", factor=2.0,
                                           seed=7)
    assert (chosen.cache, chosen.pruning, chosen.search, chosen.search.active) == ("dual", pruning, searched, True)
    chosen = app_module.read_settings(names, settings(SamplerConfig(gen_length=5)), base=DecodeConfig())
    assert chosen.sampler.steps is None and chosen.sampler.block_length is None  # 0 in the page = the default
    assert chosen.pruning == PruningConfig() and chosen.search == SearchConfig() and not chosen.search.active
    with pytest.raises(ValueError, match="setting gen_length must be a number, got 'eight'"):
        app_module.read_settings(names, ["eight", *settings()[1:]], base=DecodeConfig())
    bad_layers = ["3,four" if n == "skip_layers" else v for n, v in zip(names, settings())]
    with pytest.raises(ValueError, match="setting skip_layers must be a number, got 'four'"):
        app_module.read_settings(names, bad_layers, base=DecodeConfig())
    cache = next(o for o in DecodeConfig.options() if o.key == "cache")
    assert app_module.control(cache, "none").choices == [(c, c) for c in CACHES.names()]


def test_render_canvas_marks_masked_fixed_and_preset(model):
    sp = model.special
    tokens = [sp.mask, model.tokenizer.convert_tokens_to_ids("y"), sp.eos, model.tokenizer.convert_tokens_to_ids("n")]
    out = app_module.render_canvas(model, tokens, [0, 1, 4, -1], planned_steps=4, header="step 4")
    assert out.count('title="masked"') == 2  # the masked position and the legend
    assert 'title="fixed at step 1">y<' in out and "⟨eos⟩" in out and 'title="preset (structure prior)">n<' in out
    assert f"rgb{app_module.RAMP[0]}".replace(" ", "") in out.replace(" ", "")  # step 1 = start of the ramp
    assert "1 of 4 masked" in out
    control = model.tokenizer.convert_tokens_to_ids("ď")  # byte 0x0f: a control character
    assert ">\\x0f<" in app_module.render_canvas(model, [control], [1], planned_steps=1, header="")


def test_parse_caption():
    assert app_module.parse_caption('{"objects": []}') == ({"objects": []}, "✓ valid JSON")
    value, status = app_module.parse_caption('{"objects": [}')
    assert value is None and status.startswith("✗ not valid JSON: ") and "column 14" in status


def test_examples_absent_or_malformed(tmp_path, model_dir):
    assert app_module.load_examples(tmp_path) == []
    assert [e.answer for e in app_module.load_examples(model_dir)] == ["1", "top left"]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "examples.json").write_text('{"examples": [{"image": "a.png"}]}')
    with pytest.raises(ValueError, match="not a valid examples file"):
        app_module.load_examples(tmp_path)


def test_missing_model_dir_says_how_to_get_it(tmp_path, capsys):
    from mmdiff.cli import main

    assert main(["demo", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no model directory" in err and "make train" in err and "about 56 minutes" in err
    with pytest.raises(FileNotFoundError, match="has no .*model.safetensors"):
        app_module.check_model_dir(tmp_path)  # a directory without weights
