"""Spoken questions from a synthesiser that mmdiff never trains on: CMU Flite (``apt-get install -y flite``).

The training clips are all espeak-ng (``mmdiff.data.speech``); flite's voices are recorded-speech
diphone / clustergen voices, so they test whether the speech path learned speech or espeak. Bench
only: nothing in ``mmdiff`` or the tests needs flite. Clips get espeak's treatment otherwise: random
speaking rate (flite's ``duration_stretch``), 16 kHz mono, white noise at a random SNR.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from pathlib import Path

FLITE = "flite"
#: flite's built-in voices used (kal = 8 kHz diphone, awb_time = a talking clock: left out)
FLITE_VOICES: tuple[str, ...] = ("kal16", "awb", "rms", "slt")
STRETCH_RANGE = (0.85, 1.2)  # duration_stretch: > 1 speaks slower
NO_FLITE = "flite is not installed (apt-get install -y flite): the other-synthesiser rows are skipped"


def flite_available() -> bool:
    """Whether the flite program is on PATH."""
    return shutil.which(FLITE) is not None


def flite_clip(text: str, path: str | Path, *, voice: str, rng: random.Random) -> Path:
    """Speak ``text`` with flite ``voice`` at a random rate and write a 16 kHz mono 16-bit wav with white noise
    at a random SNR (the data sets' range).

    Raises:
        RuntimeError: flite failed (its message is included).
    """
    import numpy as np
    import soundfile as sf

    from mmdiff.data.speech import SAMPLE_RATE, SNR_RANGE_DB, add_noise
    from mmdiff.media import load_audio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmdiff-flite-") as tmp:
        raw = Path(tmp) / "raw.wav"
        proc = subprocess.run([FLITE, "-voice", voice, "--setf", f"duration_stretch={rng.uniform(*STRETCH_RANGE):.3f}",
                               "-t", text, "-o", str(raw)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{FLITE} failed for voice {voice!r}: {proc.stderr.strip() or proc.stdout.strip()}")
        wave = load_audio(raw, target_sr=SAMPLE_RATE)
    wave = np.clip(add_noise(wave, rng.uniform(*SNR_RANGE_DB), rng), -1.0, 1.0)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return path
