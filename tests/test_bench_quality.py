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


def test_probes_tables_on_a_tiny_model(tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_probes", ROOT / "bench" / "probes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tiny_model_dir), "--n", "12"]) == 0
    out = capsys.readouterr().out
    for row in ("| its image token |", "| answer position |", "| relation word |", "| row order |",
                "| column order |", "| answer |"):
        assert sum(row in line for line in out.splitlines()) == 1, row
    acc = [float(v) for line in out.splitlines() if "| relation word |" in line for v in line.split("|")[3:-1]]
    assert acc and all(0 <= a <= 1 for a in acc)


def test_pair_probe_labels_follow_the_scene(tiny_model_dir):
    """The pair-relation labels: the answer is "yes" exactly when the relation word applied to the
    row / column order holds (the decomposition the relate readout trains)."""
    spec = importlib.util.spec_from_file_location("bench_probes", ROOT / "bench" / "probes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mmdiff.data.questions import DIRECTIONS
    from mmdiff.model import MultimodalDiffusionLM

    model = MultimodalDiffusionLM.from_pretrained(tiny_model_dir).eval()
    states, labels = bench.collect_pairs(model, 20, 0)
    assert states.shape[:2] == (model.decoder.cfg.n_layers + 1, 20)
    for w, r, c, a in zip(*(labels[k].tolist() for k in bench.PAIR_TARGETS)):
        dr, dc = list(DIRECTIONS.values())[w]
        assert a == int((r - 1 if dr else c - 1) == (dr or dc))
