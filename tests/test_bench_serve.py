"""bench/serve.py end to end on a tiny random model: one table row per system and concurrency, the
engine's answers equal to the per-request loop's, and a burst against a one-request waiting line."""
import pytest
import torch
from conftest import load_bench


def test_serve_bench_prints_its_table_peak_and_burst_lines(tiny_model_dir, capsys, monkeypatch):
    bench = load_bench("serve", monkeypatch)
    threads = torch.get_num_threads()
    try:  # the tiny model is not a prefix-LM: its engine runs without a cache
        assert bench.main(["--model", str(tiny_model_dir), "--ar-model", str(tiny_model_dir), "--cache", "none",
                           "--concurrency", "1,3", "--requests", "4", "--n", "2", "--max-batch", "2",
                           "--burst", "6", "--burst-queue", "1", "--timeout", "60", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out if line.startswith("| ")]
    assert rows[0][:4] == ["system", "concurrency", "requests", "answers/s"]
    body = rows[1:]
    assert [(r[0], r[1], r[2]) for r in body] == [(s, c, "4") for s in ("engine", "per-request loop", "AR baseline")
                                                  for c in ("1", "3")]
    assert [r[-1] for r in body] == ["4/4", "4/4"] + ["-"] * 4  # identical answers, engine rows only
    assert all(float(r[3]) > 0 and float(r[9]) > 0 for r in body)  # answers/s, decoder GFLOP/s
    [peak] = [line for line in out if line.startswith("peak: fp32 matmul 2048x2048, 1 thread(s): ")]
    [burst] = [line for line in out if line.startswith("burst: 6 requests at once, engine max_queue 1")]
    assert "answered 6, dropped 0, hung 0" in burst and "identical to per-request loop 6/6" in burst


def test_serve_bench_refuses_settings_the_engine_cannot_batch(tiny_model_dir, capsys, monkeypatch):
    bench = load_bench("serve", monkeypatch)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stopped:  # the default prefix cache, on a bidirectional model
            bench.main(["--model", str(tiny_model_dir), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert stopped.value.code == 2
    assert "cache 'prefix' is exact only for models trained with the prefix mask" in capsys.readouterr().err
