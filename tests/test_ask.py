"""``mmdiff ask`` end to end on a tiny saved model (2 decoder layers): pruning flags reach
``generate`` and the ``--json`` report, ``--search`` answers through the test-time search and
reports its NFE and scored candidates, and bad combinations and inputs (no image, a decompression
bomb, non-UTF-8 text) stop with one clear line and exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff import cli
from mmdiff.sampling import DecodeConfig, SamplerConfig
from mmdiff.sampling.pruning import PruningConfig
from mmdiff.search import SearchConfig, search

QUESTION = "how many red circles are there?"
ASK = SamplerConfig(gen_length=8)  # ask's default canvas


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from mmdiff import decoder
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.encoders import vision
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))  # 2 layers
    vis = vision.preset("tiny-test")
    torch.manual_seed(0)
    return MultimodalDiffusionLM(ModelConfig(decoder=dec, vision=vis, vision_adapter=ProjectorConfig(
        kind="linear", in_dim=vis.embed_dim, out_dim=dec.d_model)), tiny_tokenizer).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ask-model")
    model.save_pretrained(path)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path / "scene.png")
    return path


def ask_json(model_dir: Path, *flags, capsys) -> dict:
    assert cli.main(["ask", QUESTION, "--image", str(model_dir / "scene.png"), "--model", str(model_dir), "--json",
                     *map(str, flags)]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_reports_the_pruning_config_it_answered_with(model, model_dir, capsys):
    out = ask_json(model_dir, "--prune", "fastv", "--keep-ratio", 0.5, "--prune-layer", 1, capsys=capsys)
    pruning = PruningConfig(prune="fastv", keep_ratio=0.5, prune_layer=1)
    assert out["pruning"] == json.loads(json.dumps(pruning.to_dict()))
    expected = model.generate([QUESTION], images=[model_dir / "scene.png"], decode=DecodeConfig(sampler=ASK, pruning=pruning))[0]
    assert out["answer"] == expected.text and out["nfe"] == expected.nfe
    assert out["search"]["strategy"] == "none" and "candidates" not in out


def test_skip_layers_alone_ignores_the_unused_prune_layer(model, model_dir, capsys):
    """Reported bug: --skip-layers 1 on a 2-layer decoder failed with "layer index 2 out of range",
    the default --prune-layer 2 being checked although nothing is pruned."""
    for flags in (["--skip-layers", 1], ["--prune", "divprune", "--skip-layers", 1]):  # keep ratio 1: no pruning
        out = ask_json(model_dir, *flags, capsys=capsys)
        assert out["pruning"]["skip_layers"] == [1] and out["pruning"]["prune_layer"] == 2
        skipped = model.generate([QUESTION], images=[model_dir / "scene.png"], decode=DecodeConfig(sampler=ASK, pruning=PruningConfig(skip_layers=(1,))))[0]
        assert out["answer"] == skipped.text
    assert cli.main(["ask", QUESTION, "--image", str(model_dir / "scene.png"), "--model", str(model_dir),
                     "--prune", "vtw", "--skip-layers", "1"]) == 2  # pruning at K=2: checked
    assert "layer index 2 out of range for a decoder of 2 layers" in capsys.readouterr().err
    assert cli.main(["ask", QUESTION, "--image", str(model_dir / "scene.png"), "--model", str(model_dir),
                     "--prune", "divprune", "--keep-ratio", "0.5", "--prune-from-step", "3",
                     "--prune-until-step", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmdiff ask: error: prune_until_step 2 must be after prune_from_step 3 (or 0: prune to the last step)"]


def test_search_reports_its_nfe_and_scored_candidates(model, model_dir, capsys):
    plain = ask_json(model_dir, capsys=capsys)
    out = ask_json(model_dir, "--search", "best_of_n", "--candidates", 2, capsys=capsys)
    config = SearchConfig(strategy="best_of_n", candidates=2)
    expected = search(model, QUESTION, image=model_dir / "scene.png", decode=DecodeConfig(sampler=ASK, search=config))
    assert out["answer"] == expected.text and out["nfe"] == expected.nfe > plain["nfe"]
    assert out["search"] == json.loads(json.dumps(config.to_dict()))
    assert [c["text"] for c in out["candidates"]] == [t for t, _ in expected.candidates]
    assert [c["score"] for c in out["candidates"]] == pytest.approx([v for _, v in expected.candidates])
    assert cli.main(["ask", QUESTION, "--image", str(model_dir / "scene.png"), "--model", str(model_dir),
                     "--search", "hierarchical", "--candidates", "2"]) == 0
    err = capsys.readouterr().err  # the answer on stdout, the cost on stderr
    assert "hierarchical over" in err and "nfe" in err


def test_search_composes_with_pruning(model_dir, capsys):
    """Search decodes through generate's denoiser, so layer skipping applies to every trajectory."""
    assert cli.main(["ask", QUESTION, "--image", str(model_dir / "scene.png"), "--model", str(model_dir),
                     "--search", "best_of_n", "--candidates", "2", "--skip-layers", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["search"]["strategy"] == "best_of_n" and out["pruning"]["skip_layers"] == [1] and out["candidates"]


def test_a_question_without_an_image_is_refused_in_one_line(model_dir, capsys):
    """The reported bug: exit 0 and an empty answer. A model with a vision encoder needs an image."""
    from mmdiff.model import NO_IMAGE

    assert cli.main(["ask", "how many objects are there?", "--model", str(model_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"mmdiff ask: error: {NO_IMAGE}\n"


def test_bad_inputs_exit_2_with_one_line(model_dir, tmp_path, capsys):
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")  # 27 KB
    cases = [(QUESTION, tmp_path / "bomb.png",
              f"cannot read image {tmp_path / 'bomb.png'}: 15000 x 15000 pixels (225 MP) is over the 64 MP limit"),
             ("\udcff\udcfe", model_dir / "scene.png",  # the bytes ff fe, as the command line passes them
              "the question is not valid UTF-8 text (byte 0xff at position 0)")]
    for question, image, message in cases:
        assert cli.main(["ask", question, "--image", str(image), "--model", str(model_dir)]) == 2
        assert capsys.readouterr().err == f"mmdiff ask: error: {message}\n"


def test_a_16_bit_png_gets_the_answer_of_its_8_bit_original(model, model_dir, tmp_path, capsys):
    grey = Image.open(model_dir / "scene.png").convert("L")
    grey.save(tmp_path / "grey8.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # mode I;16
    answers = []
    for name in ("grey8.png", "grey16.png"):
        assert cli.main(["ask", QUESTION, "--image", str(tmp_path / name), "--model", str(model_dir), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1] == model.generate([QUESTION], images=[tmp_path / "grey8.png"],
                                                      decode=DecodeConfig(sampler=ASK))[0].text
