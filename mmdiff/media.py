"""Loading images and audio clips, with errors that name the file and the problem.

Every failure is a ``ValueError`` whose message reads ``"cannot read image|audio PATH: PROBLEM"``,
so a bad sample in a data set or a bad upload in the demo is reported as itself, not as a stack
trace from PIL or libsndfile.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: A clip whose peak magnitude is below this is treated as silence (about -80 dBFS).
SILENCE_PEAK = 1e-4
#: More channels than this in an array means it was passed as (channels, n).
MAX_CHANNELS = 8


def load_image(src: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB, fully decoded (so a truncated file fails here, not in a transform).

    Args:
        src: a file path or an already opened PIL image.

    Raises:
        ValueError: the file is missing, is not an image, or its data is truncated or corrupt.
    """
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"cannot read image {path}: file not found")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: truncation surfaces as OSError here
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {path}: not an image file (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these three for damaged data
        raise ValueError(f"cannot read image {path}: truncated or corrupt image data ({e})") from None


def load_audio(src: str | Path | tuple[np.ndarray, int], *, target_sr: int = 16000,
               max_seconds: float | None = None) -> np.ndarray:
    """Read a clip as float32 mono at ``target_sr`` Hz.

    Channels are averaged (down-mix); the rate is changed with ``torchaudio.functional.resample``
    (windowed-sinc interpolation). Integer arrays are scaled to [-1, 1].

    Args:
        src: a wav/flac/ogg path, or ``(samples, sample_rate)`` with samples shaped (n,) or
            (n, channels) as soundfile returns them.
        target_sr: output sample rate.
        max_seconds: reject clips longer than this (None = no limit).

    Returns:
        (n',) float32 samples.

    Raises:
        ValueError: unreadable / not audio, empty, silent, non-finite or too long; the message
            names the file and the problem.
    """
    name, samples, sr = _read_audio(src)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # (n, ch) -> (n,)
    if samples.shape[0] == 0:
        raise ValueError(f"cannot read audio {name}: empty clip (0 samples)")
    if not np.isfinite(samples).all():
        raise ValueError(f"cannot read audio {name}: contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"cannot read audio {name}: silent clip (peak {peak:.2g} < {SILENCE_PEAK:g})")
    seconds = samples.shape[0] / sr
    if max_seconds is not None and seconds > max_seconds:
        raise ValueError(f"cannot read audio {name}: clip is {seconds:.2f} s long; the limit is {max_seconds:g} s")
    if sr != target_sr:
        import torchaudio.functional as AF

        samples = AF.resample(torch.from_numpy(samples), orig_freq=sr, new_freq=target_sr).numpy()
    return samples.astype(np.float32, copy=False)


def _read_audio(src: str | Path | tuple[np.ndarray, int]) -> tuple[str, np.ndarray, int]:
    """(display name, float32 samples (n,) or (n, ch), sample rate) from a path or an array."""
    if isinstance(src, tuple):
        array, sr = src
        name = f"<array {sr} Hz>"
        samples = np.asarray(array)
        if samples.ndim not in (1, 2):
            raise ValueError(f"cannot read audio {name}: expected shape (n,) or (n, channels), got {samples.shape}")
        if samples.ndim == 2 and samples.shape[1] > MAX_CHANNELS:
            raise ValueError(f"cannot read audio {name}: shape {samples.shape} has more than {MAX_CHANNELS} "
                             "channels; pass (n, channels), not (channels, n)")
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples / np.iinfo(samples.dtype).max
        return name, samples.astype(np.float32), int(sr)
    import soundfile as sf

    path = Path(src)
    if not path.is_file():
        raise ValueError(f"cannot read audio {path}: file not found")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (n, ch)
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio {path}: not a readable audio file ({e})") from None
    return str(path), samples, int(sr)
