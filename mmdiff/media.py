"""The media layer: images, audio clips and question text as the model reads them, or refused with the reason.

Every entry point (``mmdiff ask`` / ``caption``, ``mmdiff eval``, the demo, training, a server) reads
its inputs through this module, so a given file is read the same everywhere and a bad one gets the
same one-line message everywhere. Every failure is a ``ValueError``: ``"cannot read image|audio
PATH: PROBLEM"`` for media, ``"the question ..."`` for text; the CLI turns it into exit status 2,
``mmdiff eval`` into a line of errors.jsonl, the demo into a message on the page.

Images (:func:`load_image`) become 8-bit RGB:

* the size comes from the file's header and is checked (:data:`MAX_IMAGE_PIXELS`) before any pixel
  is decoded, so a decompression bomb (a 56 KB PNG of 15000 x 15000 pixels) costs nothing;
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled to 8 bit (v * 255 / 65535), not
  clipped (PIL's ``convert("RGB")`` makes it white); so is 32-bit integer (``I``: 16-bit levels, as
  older PIL opens 16-bit PNGs), unless no value is above 255: then it holds 8-bit levels (PIL's
  ``convert("I")`` of an 8-bit image), read as they are. 32-bit float (``F``) is read as 0..1 (the
  float-image convention) or, when a value is above 1, as 0..255 (PIL's convention); other ranges
  are refused;
* transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a palette's or a colour key's
  transparent colour) is composited on white (:data:`IMAGE_BACKGROUND`; the scenes' backgrounds are
  light, channels 200-255);
* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` go through PIL's conversion;
* the EXIF orientation is applied; of an animated image (GIF, APNG, WebP, MPO) the first frame is
  read, and a warning says so.

Audio (:func:`load_audio`) becomes float32 mono at 16 kHz: any channel count (averaged), any rate
from :data:`MIN_SAMPLE_RATE` up (windowed-sinc resampling), float or integer samples; the length is
checked from the file's header before the samples are read. A clip recorded below the target rate has
nothing above its Nyquist frequency; :func:`fill_empty_band` can fill that band with noise (see there).

Text (:func:`read_question`): valid UTF-8, no control characters but tab / newline / carriage
return and, at the edges a person types into (``mmdiff ask``, the demo), at most
:data:`MAX_QUESTION_CHARS` characters (a data set's prompts, e.g. lmms-eval's, may be longer).
"""
from __future__ import annotations

import logging
import struct
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger("mmdiff")

#: Larger images are refused from their header, before decoding (PIL's own limit applies when lower).
MAX_IMAGE_PIXELS = 64_000_000
#: Transparent pixels are composited on this colour.
IMAGE_BACKGROUND = (255, 255, 255)
#: 16-bit grey modes (PIL's names, by byte order); their values are 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Modes with an alpha band (``a``: premultiplied).
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")

#: A clip whose peak magnitude is below this is treated as silence (about -80 dBFS).
SILENCE_PEAK = 1e-4
#: More channels than this in an array means it was passed as (channels, n).
MAX_CHANNELS = 8
#: Lowest sample rate accepted: telephone speech (4 kHz of bandwidth).
MIN_SAMPLE_RATE = 8000
#: Longest clip read at all (the audio encoder's own limit, 30 s for Whisper, is usually lower).
MAX_AUDIO_SECONDS = 600.0

#: Longest typed question (mmdiff ask, the demo), in characters.
MAX_QUESTION_CHARS = 400
#: The only control characters a question may contain.
ALLOWED_CONTROLS = frozenset("\t\n\r")


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def load_image(src: str | Path | Image.Image) -> Image.Image:
    """Read an image as 8-bit RGB, fully decoded (so a truncated file fails here, not in a transform).

    Args:
        src: a file path or an already opened PIL image (converted by :func:`to_rgb`; its size is not
            checked, it is already decoded).

    Raises:
        ValueError: the file is missing, not an image, too large, truncated or corrupt, or its
            pixel values are out of range; the message names the file and the problem.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src, name=getattr(src, "filename", "") or "<PIL image>")
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"cannot read image {path}: file not found")
    try:
        size = header_size(path)
    except OSError as e:  # e.g. no permission to read it
        raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
    if size is None:
        raise ValueError(f"cannot read image {path}: not an image file (unknown format)")
    check_image_size(*size, name=path)
    allow_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # lmms-eval sets it
    try:
        img = Image.open(path)
        img.load()  # decodes every byte: truncation surfaces as OSError here
    except Image.DecompressionBombError as e:  # PIL's MAX_IMAGE_PIXELS set below ours, or a frame larger than the image
        raise ValueError(f"cannot read image {path}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL raises these for damaged data
        raise ValueError(f"cannot read image {path}: truncated or corrupt image data ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    with img:
        return to_rgb(img, name=path)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when no PIL format reads it. No pixel is decoded.

    ``Image.open`` cannot be used for this: it runs PIL's decompression-bomb check first and raises
    before the size can be reported (or warns, between ``Image.MAX_IMAGE_PIXELS`` and twice that).
    So the PIL format plugins are tried in turn, as ``Image.open`` does, without that check.
    """
    Image.init()
    with path.open("rb") as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept is not None else True
            if not verdict or isinstance(verdict, str):  # a string is PIL's "almost, but not this format"
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path)).size
            except (SyntaxError, IndexError, TypeError, struct.error, OSError, ValueError, EOFError,
                    Image.DecompressionBombError):  # not this format (PIL's own list), or a damaged header
                continue
    return None


def image_pixel_limit() -> int:
    """The largest image read: :data:`MAX_IMAGE_PIXELS`, or PIL's ``Image.MAX_IMAGE_PIXELS`` when lower."""
    return min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)


def check_image_size(width: int, height: int, *, name: str | Path) -> None:
    """Refuse an empty image or one over :func:`image_pixel_limit`.

    Raises:
        ValueError: ``"cannot read image NAME: 15000 x 15000 pixels (225 MP) is over the 64 MP limit"``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot read image {name}: empty image ({width} x {height} pixels)")
    limit = image_pixel_limit()
    if width * height > limit:
        raise ValueError(f"cannot read image {name}: {width} x {height} pixels ({width * height / 1e6:.3g} MP) "
                         f"is over the {limit / 1e6:.3g} MP limit")


def to_rgb(img: Image.Image, *, name: str | Path) -> Image.Image:
    """A decoded image of any PIL mode as 8-bit RGB (the rules are in the module docstring).

    Raises:
        ValueError: 32-bit integer or float pixel values out of the range they can be read in.
    """
    if getattr(img, "is_animated", False):
        log.warning("image %s is animated (%d frames): reading the first frame", name, img.n_frames)
    try:
        img = ImageOps.exif_transpose(img)  # a copy, turned upright
    except (OSError, SyntaxError, ValueError, KeyError, struct.error) as e:  # a damaged EXIF block
        log.warning("image %s: unreadable EXIF data (%s): its orientation is not applied", name, e)
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = Image.fromarray(_levels_to_8bit(np.asarray(img), img.mode, name))  # (H, W) uint8: mode L
    if img.mode == "La":
        img = img.convert("LA")  # the one conversion PIL has from premultiplied grey
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*IMAGE_BACKGROUND, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # PIL converts each of its other modes (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) to RGB


def _levels_to_8bit(levels: np.ndarray, mode: str, name: str | Path) -> np.ndarray:
    """(H, W) 16-bit, 32-bit integer or float levels -> uint8 (see the module docstring)."""
    if mode == "F":
        if not np.isfinite(levels).all():
            raise ValueError(f"cannot read image {name}: float pixels include NaN or infinity")
        lo, hi = float(levels.min()), float(levels.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"cannot read image {name}: float pixels range {lo:g}..{hi:g}, "
                             "neither 0..1 nor 0..255")
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.round(levels.astype(np.float64) * scale).astype(np.uint8)
    levels = levels.astype(np.int64)
    lo, hi = int(levels.min()), int(levels.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"cannot read image {name}: {mode} pixels range {lo}..{hi}, outside 0..65535")
    if mode == "I" and hi <= 255:  # PIL's convert("I") of an 8-bit image keeps its levels
        return levels.astype(np.uint8)
    return ((levels * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


# ------------------------------------------------------------------------------------------------
# audio
# ------------------------------------------------------------------------------------------------
def load_audio(src: str | Path | tuple[np.ndarray, int], *, target_sr: int = 16000,
               max_seconds: float | None = MAX_AUDIO_SECONDS, fill_db: float | None = None) -> np.ndarray:
    """Read a clip as float32 mono at ``target_sr`` Hz.

    Channels are averaged (down-mix); the rate is changed with ``torchaudio.functional.resample``
    (windowed-sinc interpolation). Signed integers are scaled by 2^(bits-1), unsigned ones centred
    first, so both span [-1, 1).

    Args:
        src: a wav/flac/ogg path, or ``(samples, sample_rate)`` with samples shaped (n,) or
            (n, channels) as soundfile returns them.
        target_sr: output sample rate.
        max_seconds: refuse longer clips (a file's length is read from its header first); None = no limit.
        fill_db: for a clip recorded below ``target_sr``: fill the band it lacks with noise at this
            level (:func:`fill_empty_band`); None leaves it empty.

    Returns:
        (n',) float32 samples.

    Raises:
        ValueError: unreadable / not audio, empty, silent, non-finite, too long or at a rate below
            :data:`MIN_SAMPLE_RATE`; the message names the file and the problem.
    """
    name, samples, sr = _read_audio(src, max_seconds=max_seconds)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # (n, ch) -> (n,)
    if samples.shape[0] == 0:
        raise ValueError(f"cannot read audio {name}: empty clip (0 samples)")
    if not np.isfinite(samples).all():
        raise ValueError(f"cannot read audio {name}: contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"cannot read audio {name}: silent clip (peak {peak:.2g} < {SILENCE_PEAK:g})")
    if sr != target_sr:
        import torchaudio.functional as AF

        samples = AF.resample(torch.from_numpy(samples), orig_freq=sr, new_freq=target_sr).numpy()
        if sr < target_sr and fill_db is not None:
            samples = fill_empty_band(samples, source_sr=sr, sample_rate=target_sr, level_db=fill_db)
    return samples.astype(np.float32, copy=False)


def fill_empty_band(samples: np.ndarray, *, source_sr: int, sample_rate: int, level_db: float) -> np.ndarray:
    """Add white noise above ``source_sr / 2`` Hz, the band a clip recorded at ``source_sr`` lacks.

    The noise has the spectral density of full-band white noise ``level_db`` below the clip's mean
    power (SNR = ``level_db``) and is zero below ``source_sr / 2``, so the band the clip has is left
    as it is. A model that only ever heard full-band speech with background noise (the shipped
    recipe adds white noise at 15-35 dB SNR) has never seen an exactly empty band; filled, an 8 kHz
    clip looks like what it was trained on. The noise is seeded, so a clip always gives the same samples.

    Args:
        samples: (n,) float32 samples at ``sample_rate``, upsampled from ``source_sr``.
        source_sr: the rate the clip was recorded at (below ``sample_rate``).
        sample_rate: the rate of ``samples``.
        level_db: signal-to-noise ratio of the fill, in dB.

    Returns:
        (n,) float32 samples.
    """
    power = float(np.mean(samples.astype(np.float64) ** 2))
    noise = np.random.default_rng(0).normal(0.0, np.sqrt(power / 10 ** (level_db / 10)), samples.shape)  # (n,)
    spectrum = np.fft.rfft(noise)  # (n // 2 + 1,)
    spectrum[np.fft.rfftfreq(samples.shape[0], 1 / sample_rate) < source_sr / 2] = 0
    return (samples + np.fft.irfft(spectrum, n=samples.shape[0])).astype(np.float32)


def _read_audio(src: str | Path | tuple[np.ndarray, int], *, max_seconds: float | None
                ) -> tuple[str, np.ndarray, int]:
    """(display name, float32 samples (n,) or (n, ch), sample rate) from a path or an array, the
    rate and length checked."""
    if isinstance(src, tuple):
        array, sr = src
        name = f"<array {sr} Hz>"
        samples = np.asarray(array)
        if samples.ndim not in (1, 2):
            raise ValueError(f"cannot read audio {name}: expected shape (n,) or (n, channels), got {samples.shape}")
        if samples.ndim == 2 and samples.shape[1] > MAX_CHANNELS:
            raise ValueError(f"cannot read audio {name}: shape {samples.shape} has more than {MAX_CHANNELS} "
                             "channels; pass (n, channels), not (channels, n)")
        _check_rate_and_length(name, sr, samples.shape[0], max_seconds)
        return name, _as_float(samples, name), int(sr)
    import soundfile as sf

    path = Path(src)
    if not path.is_file():
        raise ValueError(f"cannot read audio {path}: file not found")
    try:
        info = sf.info(str(path))
        _check_rate_and_length(str(path), info.samplerate, info.frames, max_seconds)
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (n, ch)
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio {path}: not a readable audio file ({e})") from None
    return str(path), samples, int(sr)


def _check_rate_and_length(name: str, sr: int, frames: int, max_seconds: float | None) -> None:
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.number)) or not np.isfinite(sr) or sr != int(sr):
        raise ValueError(f"cannot read audio {name}: the sample rate must be a whole number of Hz, got {sr!r}")
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"cannot read audio {name}: sample rate {sr} Hz is below {MIN_SAMPLE_RATE} Hz "
                         "(too little bandwidth for speech)")
    seconds = frames / sr
    if max_seconds is not None and seconds > max_seconds:
        raise ValueError(f"cannot read audio {name}: clip is {seconds:.2f} s long; the limit is {max_seconds:g} s")


def _as_float(samples: np.ndarray, name: str) -> np.ndarray:
    """Samples of any numeric dtype as float32 in [-1, 1) (integers by their full scale)."""
    kind = samples.dtype.kind
    if kind == "i":
        return (samples / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    if kind == "u":
        half = float(2 ** (8 * samples.dtype.itemsize - 1))
        return ((samples - half) / half).astype(np.float32)
    if kind == "f":
        return samples.astype(np.float32)
    raise ValueError(f"cannot read audio {name}: samples must be integers or floats, got dtype {samples.dtype}")


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def read_question(text: str | bytes, *, max_chars: int | None = MAX_QUESTION_CHARS) -> str:
    """A question as text the tokenizer can read, or refused with the reason.

    Args:
        text: a ``str`` (a command line's undecodable bytes arrive as lone surrogates, Python's
            ``surrogateescape``), or ``bytes`` in UTF-8.
        max_chars: the length limit (None: none).

    Raises:
        ValueError: not valid UTF-8, a control character other than tab / newline / carriage
            return, or longer than ``max_chars``.
    """
    if isinstance(text, bytes):
        text = _decode_utf8(text)
    elif not isinstance(text, str):
        raise ValueError(f"the question must be text, got {type(text).__name__}")
    elif any("\ud800" <= ch <= "\udfff" for ch in text):
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the bytes the command line could not decode
        except UnicodeEncodeError:
            raise ValueError("the question is not valid text (it contains an unpaired UTF-16 surrogate)") from None
        text = _decode_utf8(raw)
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in ALLOWED_CONTROLS), None)
    if bad is not None:
        raise ValueError(f"the question contains the control character U+{ord(bad):04X}; "
                         "only tab, newline and carriage return are allowed")
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"the question is {len(text)} characters long; the limit is {max_chars}")
    return text


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the question is not valid UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start})") from None
