"""bench/quality.py runs end to end on a tiny model and prints its table."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_table_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    assert bench.main(["--model", str(tiny_model_dir), "--ar-model", str(tiny_model_dir), "--per-type", "2",
                       "--spoken", "0", "--captions", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| count | 2 |" in table and "AR baseline" in table and "typed, all short types" in table
    res = json.loads(out.read_text())
    assert set(res) == {"diffusion", "AR baseline"} and 0 <= res["diffusion"]["count"]["accuracy"] <= 1
    assert "parse" in res["AR baseline"]["caption_json"]


def test_long_block_decodes_captions_in_blocks(tiny_model_dir, tmp_path, monkeypatch):
    """--long-block: captions decode in semi-autoregressive blocks; short types are unaffected."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls, original = [], bench.answer
    monkeypatch.setattr(bench, "answer", lambda *a, **k: (calls.append(k["block_length"]), original(*a, **k))[1])
    out = tmp_path / "q.json"
    assert bench.main(["--model", str(tiny_model_dir), "--ar-model", "none", "--per-type", "1", "--spoken", "0",
                       "--captions", "1", "--long-block", "32", "--json", str(out)]) == 0
    assert sorted(calls, key=str) == sorted([None] * 7 + [32, 32], key=str)  # 7 short families, 2 caption kinds
    res = json.loads(out.read_text())["diffusion"]
    assert "parse" in res["caption_json"] and 0 <= res["count"]["accuracy"] <= 1
