"""Spoken questions: espeak-ng synthesis, resampled to 16 kHz mono, with white noise at a random SNR.

Voices are espeak-ng voice names with variants ("en-gb+f2" = British English, female variant 2).
Training and validation clips use :data:`TRAIN_VOICES`; split "test" uses only the disjoint
:data:`HELDOUT_VOICES` (accents and variants never heard in training), so test audio measures generalisation to unseen speakers.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .scenes import check_split

ESPEAK = "espeak-ng"
SAMPLE_RATE = 16_000  # Hz, what the audio encoders expect
#: training accents and voice variants; every pairing is a training voice (50 speakers)
TRAIN_ACCENTS: tuple[str, ...] = ("en-us", "en-gb", "en-029", "en-gb-x-gbclan", "en-gb-x-rp")
TRAIN_VARIANTS: tuple[str, ...] = ("", "m1", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4")
TRAIN_VOICES: tuple[str, ...] = tuple(a + (f"+{v}" if v else "") for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS)
#: test-only voices: neither their accent nor their variant is ever heard in training
HELDOUT_VOICES: tuple[str, ...] = ("en-gb-scotland+m2", "en-us-nyc+f5", "en-gb-x-gbcwmd+m7")
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng pitch, 0..99
SNR_RANGE_DB = (15.0, 35.0)

assert not {v.partition("+")[0] for v in HELDOUT_VOICES} & set(TRAIN_ACCENTS), "held-out accents must be unheard"
assert not {v.partition("+")[2] for v in HELDOUT_VOICES} & set(TRAIN_VARIANTS), "held-out variants must be unheard"


@dataclass(frozen=True)
class VoiceParams:
    """How one clip is spoken.

    Args:
        voice: espeak-ng voice name, optionally with a "+variant".
        speed: words per minute.
        pitch: espeak-ng pitch (0..99).
        snr_db: signal-to-noise ratio of the added white noise, in dB.
    """

    voice: str
    speed: int
    pitch: int
    snr_db: float


def espeak_available() -> bool:
    """Whether the espeak-ng program is on PATH."""
    return shutil.which(ESPEAK) is not None


def voices_for(split: str) -> tuple[str, ...]:
    """The voices a split may use: HELDOUT_VOICES for "test", TRAIN_VOICES otherwise.

    Args:
        split: "train", "val" or "test".
    """
    return HELDOUT_VOICES if check_split(split) == "test" else TRAIN_VOICES


def sample_voice(rng: random.Random, split: str) -> VoiceParams:
    """Draw a voice of ``split`` with a random speed, pitch and SNR.

    Args:
        rng: random source.
        split: "train", "val" or "test".
    """
    return VoiceParams(
        voice=rng.choice(voices_for(split)),
        speed=rng.randint(*SPEED_RANGE),
        pitch=rng.randint(*PITCH_RANGE),
        snr_db=rng.uniform(*SNR_RANGE_DB),
    )


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by zero-padding / truncating its spectrum.

    Exact for band-limited periodic signals; espeak clips start and end in silence, so the
    periodic wrap-around is harmless.

    Args:
        wave: (T,) float signal.
        orig_sr: its sample rate.
        new_sr: the wanted sample rate.
    """
    if orig_sr == new_sr:
        return wave.astype(np.float32)
    n_out = round(len(wave) * new_sr / orig_sr)
    spectrum = np.fft.rfft(wave.astype(np.float64))  # (T//2+1,)
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / len(wave))  # (n_out,)
    return out.astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: random.Random) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` relative to the mean power of ``wave``.

    Args:
        wave: (T,) float signal.
        snr_db: 10 * log10(P_signal / P_noise).
        rng: random source (seeds the noise, so the clip is deterministic).
    """
    power = float(np.mean(wave.astype(np.float64) ** 2))
    sigma = np.sqrt(power / 10 ** (snr_db / 10))
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, size=wave.shape)
    return (wave + noise).astype(np.float32)


def synthesize(text: str, path: str | Path, *, voice: str, speed: int, pitch: int, snr_db: float,
               rng: random.Random) -> Path:
    """Speak ``text`` with espeak-ng and write a 16 kHz mono 16-bit PCM wav with added noise.

    Args:
        text: what to say.
        path: output .wav path (parent folders are created).
        voice: espeak-ng voice name, e.g. "en-gb+f2".
        speed: words per minute.
        pitch: espeak-ng pitch, 0..99.
        snr_db: signal-to-noise ratio of the added white noise.
        rng: random source for the noise.

    Raises:
        RuntimeError: espeak-ng is not installed, or it failed (its message is included).
    """
    if not espeak_available():
        raise RuntimeError(f"{ESPEAK} not found on PATH: spoken questions need it (apt-get install -y espeak-ng)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, raw = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".espeak.wav")
    os.close(fd)
    try:
        cmd = [ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw, "--", text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{ESPEAK} failed for voice {voice!r}: {proc.stderr.strip() or proc.stdout.strip()}")
        wave, sr = sf.read(raw, dtype="float32", always_2d=True)  # (T, C)
    finally:
        os.unlink(raw)
    wave = resample(wave.mean(axis=1), sr, SAMPLE_RATE)  # (T',) mono
    wave = np.clip(add_noise(wave, snr_db, rng), -1.0, 1.0)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return path


def speak(text: str, path: str | Path, *, split: str, rng: random.Random) -> tuple[Path, VoiceParams]:
    """Synthesize ``text`` with a voice, speed, pitch and SNR drawn for ``split``.

    Args:
        text: what to say.
        path: output .wav path.
        split: decides the voice pool (held-out voices for "test").
        rng: random source for the voice parameters and the noise.
    """
    params = sample_voice(rng, split)
    return synthesize(text, path, voice=params.voice, speed=params.speed, pitch=params.pitch,
                      snr_db=params.snr_db, rng=rng), params
