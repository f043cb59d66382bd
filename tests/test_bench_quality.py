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
