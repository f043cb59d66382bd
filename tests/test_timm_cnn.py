"""A pretrained convolutional image backbone (issue #21): the ``timm_cnn`` vision encoder, read at one feature stage
with frozen BatchNorm, and ``mmdiff convert-timm-cnn``, which writes a released state dict under timm's names.
References: timm's own ``forward_intermediates`` of the same network with the same tensors."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmdiff import cli
from mmdiff.adapters import ProjectorConfig
from mmdiff.checkpoints.timm_cnn import convert_timm_cnn, to_timm_names
from mmdiff.checkpoints.whisper_ct2 import sha256_of
from mmdiff.encoders.vision import VisionEncoderConfig, build_vision_encoder

from test_cli_edges import fails

NAME = "tf_efficientnet_lite0"  # the backbone `make vision-weights` converts


@pytest.fixture(scope="module")
def reference():
    """A timm network with random weights (BatchNorm statistics too) and its state dict as a 'released' port:
    the same tensors in the same order under other names, saved with torch.save (plain tensors)."""
    torch.manual_seed(0)
    net = timm.create_model(NAME, pretrained=False).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    released = OrderedDict((f"_port.t{i}.{k.rsplit('.', 1)[-1]}", v.clone())
                           for i, (k, v) in enumerate(net.state_dict().items()))
    return net, released


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory) -> Path:
    net, released = reference
    folder = tmp_path_factory.mktemp("lite0")
    torch.save(released, folder / "released.pth")
    convert_timm_cnn(folder / "released.pth", folder / "lite0.safetensors", model=NAME,
                     sha256=sha256_of(folder / "released.pth"))
    return folder / "lite0.safetensors"


def test_the_converter_pairs_a_port_by_position_and_drops_the_classifier(reference, weights):
    net, _ = reference
    state = load_file(str(weights))
    assert not any(k.startswith("classifier.") for k in state)
    assert set(state) == {k for k in net.state_dict() if not k.startswith("classifier.")}
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items() if k in state)


@pytest.mark.parametrize("img_size, grid", [(64, (4, 4)), (96, (6, 6))])
def test_the_encoder_returns_the_stage_map_of_timms_own_network(reference, weights, img_size, grid):
    net, _ = reference
    enc = build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=img_size, layer=3,
                                                   weights=str(weights))).eval()
    assert enc.grid == grid and enc.out_dim == 112 and enc.num_tokens == grid[0] * grid[1]
    pixels = enc.preprocess([Image.new("RGB", (img_size, img_size // 2), (200, 30, 30)),
                             Image.new("RGB", (40, 40), (10, 90, 200))])
    assert pixels.shape == (2, 3, img_size, img_size)
    with torch.no_grad():
        (want,) = net.forward_intermediates(pixels, indices=[3], intermediates_only=True)
        got = enc(pixels)
    assert got.shape == (2, grid[0] * grid[1], 112)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_stay_frozen_in_training_mode(weights):
    enc = build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3,
                                                   weights=str(weights)))
    enc.train()
    assert enc.training and not any(m.training for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    enc(torch.randn(4, 3, 64, 64) * 3).sum().backward()
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert enc.model.conv_stem.weight.grad is not None  # still trainable where a stage trains "vision"


def test_a_model_with_the_cnn_tower_saves_and_loads(weights, tiny_tokenizer, tmp_path):
    import mmdiff
    from mmdiff import decoder
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3, weights=str(weights))
    cfg = ModelConfig(decoder=dec, vision=vis, vision_adapter=ProjectorConfig(kind="linear", in_dim=112,
                                                                              out_dim=dec.d_model))
    model = MultimodalDiffusionLM(cfg, tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["vision"]["kind"] == "timm_cnn" and saved["vision"]["weights"] is None  # inside model.safetensors
    back = mmdiff.load(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    (out,) = back.generate(["what color is the object?"], images=[image])
    assert isinstance(out.text, str)


def test_bad_configs_and_files_are_one_clear_error(weights, tmp_path):
    with pytest.raises(ValueError, match="img_size must be set"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, layer=3))
    with pytest.raises(ValueError, match="not a convolutional backbone"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name="vit_tiny_patch16_224", img_size=64))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name="no_such_net", img_size=64))
    with pytest.raises(ValueError, match="out of range"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=7))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("blocks.2.")}, str(partial))
    with pytest.raises(ValueError, match=r"not weights of timm 'tf_efficientnet_lite0': \d+ tensors missing"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3,
                                                 weights=str(partial)))


def test_a_different_network_is_refused_not_mis_mapped(reference):
    net, released = reference
    other = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    with pytest.raises(ValueError, match="not the same network"):
        to_timm_names(released, OrderedDict(other))
    swapped = OrderedDict(released)
    keys = list(swapped)
    swapped = OrderedDict([(keys[1], released[keys[1]]), (keys[0], released[keys[0]]), *list(released.items())[2:]])
    with pytest.raises(ValueError, match="does not pair with timm's"):
        to_timm_names(swapped, OrderedDict(net.state_dict()))


def test_the_command_refuses_a_wrong_hash_or_a_file_of_objects_in_one_line(reference, tmp_path, capsys):
    _, released = reference
    torch.save(released, tmp_path / "r.pth")
    line = fails(["convert-timm-cnn", str(tmp_path / "r.pth"), str(tmp_path / "o.safetensors"), "--model", NAME,
                  "--sha256", "0" * 64], capsys)
    assert "is not the pinned" in line and not (tmp_path / "o.safetensors").exists()
    torch.save({"weights": "not a tensor"}, tmp_path / "obj.pth")
    line = fails(["convert-timm-cnn", str(tmp_path / "obj.pth"), str(tmp_path / "o.safetensors"), "--model", NAME],
                 capsys)
    assert "not a state dict of plain tensors" in line
    assert "no such weight file" in fails(["convert-timm-cnn", str(tmp_path / "none.pth"),
                                           str(tmp_path / "o.safetensors"), "--model", NAME], capsys)
    assert cli.main(["convert-timm-cnn", str(tmp_path / "r.pth"), str(tmp_path / "o.safetensors"), "--model", NAME]) == 0
    assert "converted" in capsys.readouterr().out


def test_the_tower_swap_script_refuses_missing_weights_in_one_line(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "sweeps" / "vision-lite0" / "swap_tower.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--weights", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("write it with make vision-weights")
    assert not (tmp_path / "out").exists()


def test_fine_tuning_keeps_a_frozen_tower_frozen_unless_named(weights, tiny_tokenizer, tmp_path):
    """``timm_cnn`` is ``frozen`` by default: the default ``--train all`` leaves the tower as it is and reads its
    features once; ``--train vision`` trains it; a config that says ``frozen: false`` lets ``all`` train it."""
    from mmdiff import decoder
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM
    from mmdiff.training.finetune import FineTuner

    from test_finetune import config, llava_file

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=32, layer=2, weights=str(weights))
    assert vis.frozen is True and VisionEncoderConfig(kind="timm").frozen is False
    cfg = ModelConfig(decoder=dec, vision=vis, vision_adapter=ProjectorConfig(kind="linear", in_dim=40,
                                                                              out_dim=dec.d_model))
    torch.manual_seed(0)
    MultimodalDiffusionLM(cfg, tiny_tokenizer).save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vision"]["frozen"] is True
    data = llava_file(tmp_path)
    before = {k: v.clone() for k, v in MultimodalDiffusionLM.from_pretrained(tmp_path / "m").state_dict().items()}

    tuner = FineTuner(config(tmp_path / "a", data, tmp_path / "m"), resume=False, progress=False)
    assert "vision" not in tuner.parts and "decoder" in tuner.parts and tuner.store.features is not None  # computed once
    tuner.run()
    after = MultimodalDiffusionLM.from_pretrained(tmp_path / "a" / "out").state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("vision."))
    assert not all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder."))

    named = FineTuner(config(tmp_path / "b", data, tmp_path / "m", train=["vision", "decoder"]), resume=False,
                      progress=False)
    assert named.parts == ["vision", "decoder"] and named.store.features is None
    thawed = json.loads((tmp_path / "m" / "config.json").read_text())
    thawed["vision"]["frozen"] = False
    (tmp_path / "m" / "config.json").write_text(json.dumps(thawed))
    assert "vision" in FineTuner(config(tmp_path / "c", data, tmp_path / "m"), resume=False, progress=False).parts


def test_pixel_cells_append_each_cells_pooled_pixels(weights):
    """``pixel_cells`` p: each token is the stage's features, then its cell's pixels average-pooled to p x p
    (channel-major, as space-to-depth folds them); a config that cannot hold it is one clear error."""
    plain = build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3,
                                                     weights=str(weights))).eval()
    enc = build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3,
                                                   weights=str(weights), pixel_cells=2)).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = enc(x), plain(x)
    assert enc.out_dim == 112 + 12 and out.shape == (2, 16, 124)  # 64 px at stride 16: 4 x 4 cells of 16 px
    assert torch.equal(out[..., :112], ref)
    r, c = 1, 2
    cell = x[1, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]  # (3, 16, 16)
    expect = cell.reshape(3, 2, 8, 2, 8).mean((2, 4)).reshape(-1)  # (3, 2, 2) sub-cell means, channel-major
    assert torch.allclose(out[1, r * 4 + c, 112:], expect, atol=1e-6)
    for bad in (dict(kind="timm_cnn", pixel_cells=-1), dict(kind="timm", pixel_cells=2)):
        with pytest.raises(ValueError, match="pixel_cells"):
            VisionEncoderConfig(**bad)
    with pytest.raises(ValueError, match="pixel_cells 3 needs img_size 64 to split into 4 x 4 cells"):
        build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name=NAME, img_size=64, layer=3,
                                                 weights=str(weights), pixel_cells=3))


def test_a_config_with_a_non_boolean_frozen_is_one_clear_error():
    from mmdiff.model import ModelConfig

    saved = json.loads((Path(__file__).resolve().parents[1] / "checkpoints" / "mmdiff-tiny" / "config.json").read_text())
    saved["vision"]["frozen"] = "yes"
    with pytest.raises(ValueError, match="config.json vision: frozen must be a bool"):
        ModelConfig.from_dict(saved)
