"""Adapter-only training against a frozen loaded decoder (the tiny LLaDA fixture), single process,
under torchrun with two gloo processes, and through the ``train-adapter`` command."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdiff.data.dataset import Row, read_rows, write_split
from mmdiff.encoders.audio import AudioEncoderConfig
from mmdiff.encoders.vision import VisionEncoderConfig, preset
from mmdiff.loading import load as load_multimodal
from mmdiff.training import adapters
from mmdiff.training.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    attach_encoder,
    attach_trained_adapter,
    train_adapter,
    usable_rows,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY_WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny LLaDA fixture plus a tokenizer (the fixture ships none)."""
    src = FIXTURES / "llada-tiny"
    if not (src / "config.json").is_file():
        pytest.skip(f"LLaDA fixture not found at {src}")
    d = tmp_path_factory.mktemp("base") / "llada-tiny"
    shutil.copytree(src, d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("data"), split="train", n=8, seed=0, progress=False)


def rows_of(path: Path) -> list[Row]:
    return [r for r in read_rows(path) if isinstance(r, Row)]


def image_model(base: Path):
    torch.manual_seed(0)
    model = load_multimodal(base)
    attach_encoder(model, "image", preset("tiny-test"), "linear")
    return model


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_the_adapter_learns(base, data):
    model = image_model(base)
    decoder, vision, adapter = snapshot(model.decoder), snapshot(model.vision), snapshot(model.vision_adapter)
    losses = train_adapter(model, rows_of(data), modality="image", steps=3, lr=1e-2, batch_size=4)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = model.vision_adapter.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in adapter.items())  # weight and bias moved
    assert all(torch.equal(model.decoder.state_dict()[k], v) for k, v in decoder.items())  # bit-identical
    assert all(torch.equal(model.vision.state_dict()[k], v) for k, v in vision.items())
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"vision_adapter"}


def test_attached_encoder_and_adapter_shapes(base):
    model = image_model(base)
    cfg = model.cfg.vision_adapter
    assert (cfg.kind, cfg.in_dim, cfg.out_dim, cfg.grid) == ("linear", 32, 64, (4, 4))
    assert model.cfg.vision == preset("tiny-test")
    with pytest.raises(ValueError, match="already has a image encoder"):
        attach_encoder(model, "image", preset("tiny-test"))


@pytest.mark.needs_espeak
def test_audio_adapter_learns_with_a_frozen_image_path(base, tmp_path):
    path = write_split(tmp_path / "spoken", split="train", n=4, seed=1, audio=True, progress=False)
    rows = rows_of(path)
    assert usable_rows(rows, "audio")
    model = image_model(base)
    attach_encoder(model, "audio", AudioEncoderConfig(**TINY_WHISPER), "audio_semantic")
    frozen = snapshot(model.vision_adapter)
    audio_adapter = snapshot(model.audio_adapter)
    losses = train_adapter(model, rows, modality="audio", steps=2, lr=1e-2, batch_size=2)
    assert len(losses) == 2
    assert all(torch.equal(model.vision_adapter.state_dict()[k], v) for k, v in frozen.items())
    assert any(not torch.equal(model.audio_adapter.state_dict()[k], v) for k, v in audio_adapter.items())


def test_errors_name_the_problem(base, data):
    model = load_multimodal(base)
    with pytest.raises(ValueError, match="no audio encoder: attach one first"):
        train_adapter(model, rows_of(data), modality="audio", steps=1, lr=1e-3, batch_size=1)
    model = image_model(base)
    attach_encoder(model, "audio", AudioEncoderConfig(**TINY_WHISPER))
    with pytest.raises(ValueError, match="none of the 8 rows can train the audio adapter"):
        train_adapter(model, rows_of(data), modality="audio", steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        train_adapter(model, rows_of(data), modality="video", steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="'linear' is an image adapter, not an audio one"):
        attach_encoder(load_multimodal(base), "audio", model.cfg.audio, "linear")


def test_attached_ctc_adapter_takes_the_decoders_vocabulary(base):
    model = load_multimodal(base)
    cfg = attach_encoder(model, "audio", AudioEncoderConfig(**TINY_WHISPER), "audio_ctc")
    assert cfg.vocab_size == model.cfg.decoder.vocab_size and model.cfg.audio_adapter == cfg
    assert model.audio_adapter.ctc.out_features == cfg.vocab_size + 1  # the tokens and a blank


# ------------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank: int, port: int, base: str, data: str, out: str) -> None:
    """One rank: its own initial adapter (rank 0's is broadcast) and its own batches."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo")  # gloo even where CUDA exists (one GPU, two ranks)
    torch.manual_seed(rank)
    model = load_multimodal(base)
    attach_encoder(model, "image", VisionEncoderConfig(kind="siglip", name="siglip-tiny-test"), "linear")
    losses = train_adapter(model, rows_of(Path(data)), modality="image", steps=3, lr=1e-2, batch_size=2)
    save_file({k: v.contiguous() for k, v in model.vision_adapter.state_dict().items()},
              f"{out}/rank{rank}.safetensors")
    Path(f"{out}/losses{rank}.json").write_text(json.dumps(losses))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_end_with_identical_adapters(base, data, tmp_path):
    import torch.multiprocessing as mp

    # fork: the ranks inherit the imported modules (spawning two fresh interpreters costs ~10 s of
    # imports on 2 busy cores); safe here, the parent is single-threaded (conftest) and has no CUDA
    mp.start_processes(two_rank_worker, args=(free_port(), str(base), str(data), str(tmp_path)), nprocs=2,
                       start_method="fork")
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    l0, l1 = (json.loads((tmp_path / f"losses{r}.json").read_text()) for r in (0, 1))
    assert l0 != l1  # each rank trained on its own batches


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    adapters.add_arguments(p)
    return p.parse_args(argv)


def test_command_writes_an_adapter_that_loads_back(base, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = parse(["--base", str(base), "--data", str(data), "--modality", "image", "--out", str(out),
                  "--vision", "tiny-test", "--adapter", "mlp2x_gelu", "--steps", "2", "--batch-size", "2"])
    assert adapters.run(args) == 0
    assert "trained the image adapter for 2 steps on 1 process(es)" in capsys.readouterr().out
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["modality"] == "image" and meta["adapter"]["kind"] == "mlp2x_gelu" and meta["training"]["steps"] == 2
    model = load_multimodal(base)
    attach_trained_adapter(model, out)
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert all(torch.equal(model.vision_adapter.state_dict()[k], v) for k, v in saved.items())
    image = next(iter(rows_of(data))).image
    assert model.generate(["what is this?"], images=[image])[0].tokens
    # an adapter.json written before issue #18 (one flat adapter config for every kind) loads the same adapter
    assert meta["adapter"] == {"kind": "mlp2x_gelu", "in_dim": 32, "out_dim": 64, "pool": 1, "grid": [4, 4],
                               "norm": False, "pos_embed": False, "newline": False}
    meta["adapter"].update(subsample=4, num_queries=16, qformer_layers=2, qformer_heads=4, n_encoder_layers=1,
                           vocab_size=0, words=None, word_ids=None, position_weight=1.0, empty_weight=1.0,
                           beam_width=8, lm_weight=0.3, length_bonus=1.5)
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta))
    old = load_multimodal(base)
    attach_trained_adapter(old, out)
    assert old.cfg.vision_adapter == model.cfg.vision_adapter
    assert all(torch.equal(old.vision_adapter.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("argv, message", [
    (["--modality", "image"], "has no image encoder: give --vision"),
    (["--modality", "image", "--audio-encoder", "x.json"], "--audio-encoder does not apply to --modality image"),
    (["--modality", "audio", "--vision", "tiny-test"], "--vision/--vision-weights does not apply"),
])
def test_command_flag_errors(base, data, tmp_path, argv, message):
    args = parse(["--base", str(base), "--data", str(data), "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(ValueError, match=message):
        adapters.run(args)
