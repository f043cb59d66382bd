"""bench/byod_probe.py's bad input: one line, exit 2, before any model or data is read."""
import pytest
from conftest import load_bench


@pytest.fixture
def bench(monkeypatch):
    return load_bench("byod_probe", monkeypatch)


@pytest.mark.parametrize("value, message", [("abc", "--pretrain 'abc': give comma-separated step counts"),
                                            ("250,0", "--pretrain '250,0': step counts must be positive")])
def test_bad_pretrain_steps_are_refused_in_one_line(value, message, capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--pretrain", value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_is_refused_in_one_line(tmp_path, capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--data", str(tmp_path / "none"), "--pretrain", "5"])
    assert exit_.value.code == 2 and "no train.json" in capsys.readouterr().err


def test_a_missing_tower_file_is_refused_in_one_line(tmp_path, capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--tower", str(tmp_path / "none.safetensors"), "--grid"])
    assert exit_.value.code == 2 and "--tower" in capsys.readouterr().err


def test_the_pretrained_tower_is_probed_on_its_whole_grid(tmp_path, capsys, bench):
    """End to end on a tiny LLaVA-format dataset and a randomly initialised tf_efficientnet_lite0 file."""
    import json

    import timm
    from PIL import Image
    from safetensors.torch import save_file

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()},
              str(tmp_path / "lite0.safetensors"))
    shapes = bench.SHAPES
    for split, n in (("train", 10), ("test", 5)):
        rows = []
        for i in range(n):
            Image.new("RGB", (64, 48), (40 * i % 255, 90, 200)).save(tmp_path / f"{split}{i}.png")
            rows.append({"image": f"{split}{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat shape is it?"},
                {"from": "gpt", "value": shapes[i % len(shapes)], "type": "shape"}]})
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
    bench.main(["--data", str(tmp_path), "--tower", str(tmp_path / "lite0.safetensors"), "--tower-size", "64",
                "--grid", "--no-rows", "--threads", "1"])
    out = capsys.readouterr().out
    assert "16 tokens of 112" in out and "| pretrained tower, frozen | linear, whole grid |" in out
