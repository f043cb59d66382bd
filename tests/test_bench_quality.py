"""The bench scripts (quality, probes, per-voice ASR) run end to end on tiny models and print their tables."""
import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_quality_table_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    assert bench.main(["--model", str(tiny_model_dir), "--ar-model", str(tiny_model_dir), "--per-type", "2",
                       "--spoken", "0", "--other-spoken", "0", "--captions", "1", "--json", str(out)]) == 0
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
                       "--other-spoken", "0", "--captions", "1", "--long-block", "38", "--json", str(out)]) == 0
    assert sorted(calls, key=str) == sorted([None] * 7 + [38, 38], key=str)  # 7 short families, 2 caption kinds
    res = json.loads(out.read_text())["diffusion"]
    assert "parse" in res["caption_json"] and 0 <= res["count"]["accuracy"] <= 1


def test_quality_skips_workloads_asked_for_zero_times(tiny_model_dir, tmp_path):
    """--per-type 0 (captions only) used to divide by zero on the empty short families."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    assert bench.main(["--model", str(tiny_model_dir), "--ar-model", "none", "--per-type", "0", "--spoken", "0",
                       "--other-spoken", "0", "--captions", "1", "--json", str(out)]) == 0
    assert sorted(json.loads(out.read_text())["diffusion"]) == ["caption", "caption_json"]


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


@pytest.mark.needs_espeak
def test_asr_voices_table(tmp_path, tiny_tokenizer, capsys):
    """bench/asr_voices.py speaks real clips per voice and prints one WER row per voice and model."""
    from mmdiff.data.speech import HELDOUT_VOICES
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    cfg = ModelConfig.from_dict({
        "model_type": "mmdiff",
        "decoder": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden": 64,
                    "vocab_size": len(tiny_tokenizer)},
        "audio": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                  "num_mel_bins": 80, "max_source_positions": 400, "max_seconds": 8.0},
        "audio_adapter": {"kind": "audio_ctc", "in_dim": 32, "out_dim": 32}})
    MultimodalDiffusionLM(cfg, tiny_tokenizer).save_pretrained(tmp_path / "m")
    spec = importlib.util.spec_from_file_location("bench_asr_voices", ROOT / "bench" / "asr_voices.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tmp_path / "m"), "--per-voice", "1", "--voices", "en-us"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| en")]
    assert [r.split(" | ")[0][2:] for r in rows] == [*HELDOUT_VOICES, "en-us"]
    assert [r.split(" | ")[1] for r in rows] == ["yes"] * len(HELDOUT_VOICES) + ["no"]
    assert all(float(r.split(" | ")[3]) >= 0 for r in rows)


@pytest.mark.needs_espeak
def test_quality_leaves_no_clips_behind(tiny_model_dir, tmp_path, monkeypatch):
    """The spoken clips live in a temporary folder that is gone once main returns."""
    import tempfile

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    made = []
    build = bench.build_examples

    def spy(args, folder):
        work = build(args, folder)
        made.extend(Path(e["audio"]) for e in work["spoken"])
        return work

    monkeypatch.setattr(bench, "build_examples", spy)
    assert bench.main(["--model", str(tiny_model_dir), "--ar-model", "none", "--per-type", "1", "--spoken", "2",
                       "--other-spoken", "0", "--captions", "0"]) == 0
    assert len(made) == 2 and all(p.is_relative_to(tmp_path / "tmp") for p in made)
    assert list((tmp_path / "tmp").iterdir()) == []
