"""bench/transcripts.py: the silence measure, and its bad input (one line, exit 2)."""
import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture
def bench(monkeypatch):
    return load_bench("transcripts", monkeypatch)


def test_edges_measures_the_silence_around_a_tone(bench):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wave = np.concatenate([np.zeros(3200), 0.5 * np.sin(2 * np.pi * 220 * t), np.zeros(4800)])
    wave = (wave + 1e-4 * rng.standard_normal(len(wave))).astype(np.float32)
    lead, trail = bench.edges(wave)
    assert lead == pytest.approx(0.2, abs=0.011) and trail == pytest.approx(0.3, abs=0.011)


def test_zero_clips_is_refused_in_one_line(capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--models", "x", "--n", "0"])
    assert exit_.value.code == 2 and "--n 0: give at least one clip" in capsys.readouterr().err


def test_a_model_without_a_ctc_speech_path_is_refused(tiny_model_dir, capsys, bench):
    from other_tts import flite_available

    if not flite_available():
        pytest.skip("flite is not installed (apt-get install -y flite)")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--models", str(tiny_model_dir), "--n", "2"])
    assert exit_.value.code == 2 and "no audio_ctc speech path" in capsys.readouterr().err


def test_lead_silence_is_checked_and_puts_the_noise_floor_first(tmp_path, capsys, bench):
    import soundfile as sf

    with pytest.raises(SystemExit) as exit_:
        bench.main(["--models", "x", "--lead-silence", "-1"])
    assert exit_.value.code == 2 and "--lead-silence -1.0: give 0 to 10 seconds" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    wave = np.concatenate([0.01 * rng.standard_normal(1600), 0.5 * np.sin(np.arange(8000) / 3)]).astype(np.float32)
    path = tmp_path / "c.wav"
    sf.write(path, wave, 16000, subtype="PCM_16")
    bench.lengthen_lead(str(path), 0.5, seed=1)
    got, _ = sf.read(path, dtype="float32")
    assert len(got) == len(wave) + 8000
    assert np.sqrt(np.mean(got[:8000] ** 2)) == pytest.approx(0.01, rel=0.1)
    np.testing.assert_allclose(got[8000:], wave, atol=1e-4)


@pytest.mark.needs_espeak
def test_the_table_of_the_shipped_model_leaves_no_clips_behind(tmp_path, capsys, monkeypatch, bench):
    """End to end on the shipped speech path: flite clips written into one temporary folder that stays until
    the tables are printed and is gone afterwards."""
    import tempfile
    from pathlib import Path

    from other_tts import flite_available

    if not flite_available():
        pytest.skip("flite is not installed (apt-get install -y flite)")
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "mmdiff-tiny"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert bench.main(["--models", str(shipped), "--n", "4", "--show", "4"]) == 0
    out = capsys.readouterr().out
    assert "| flite |" in out and f"| {shipped} | " in out
    assert list(tmp_path.iterdir()) == []
