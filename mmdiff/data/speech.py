"""Spoken questions: espeak-ng synthesis (libespeak-ng from the ``espeakng-loader`` package; no program
needed), resampled to 16 kHz mono, with white noise at a random SNR.

Voices are espeak-ng voice names with variants ("en-gb+f2" = British English, female variant 2).
Training and validation clips use :data:`TRAIN_VOICES`; split "test" uses only the disjoint
:data:`HELDOUT_VOICES` (accents and variants never heard in training), so test audio measures generalisation to unseen speakers.
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .scenes import check_split

#: the one reason given wherever speech cannot be synthesised (errors, skipped tests)
NO_SYNTHESISER = ("libespeak-ng not found: spoken questions need the espeakng-loader package "
                  "(pip install espeakng-loader)")
# espeak_lib.h: synchronous output, espeakRATE / espeakPITCH, POS_CHARACTER, and the espeak-ng program's
# flags espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE
_AUDIO_OUTPUT_SYNCHRONOUS, _ESPEAK_RATE, _ESPEAK_PITCH, _POS_CHARACTER = 2, 1, 3, 1
_SYNTH_FLAGS = 0x0 | 0x100 | 0x1000
_FORK_LOCK = threading.Lock()
SAMPLE_RATE = 16_000  # Hz, what the audio encoders expect
#: training accents and voice variants; every pairing is a training voice (50 speakers)
TRAIN_ACCENTS: tuple[str, ...] = ("en-us", "en-gb", "en-029", "en-gb-x-gbclan", "en-gb-x-rp")
TRAIN_VARIANTS: tuple[str, ...] = ("", "m1", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4")
TRAIN_VOICES: tuple[str, ...] = tuple(a + (f"+{v}" if v else "") for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS)
#: test-only voices: neither their accent nor their variant is ever heard in training
HELDOUT_VOICES: tuple[str, ...] = ("en-gb-scotland+m2", "en-us-nyc+f5", "en-gb-x-gbcwmd+m7")
#: the phoneme tables of the training accents (espeak-ng-data/lang/gmw: en, en-US, en-029, en-GB-x-gbclan,
#: en-GB-x-rp); a synthetic accent (:func:`write_accent`) is built on one of them, never on a held-out accent's
TRAIN_PHONEME_TABLES: tuple[str, ...] = ("en", "en-us", "en-wi", "en-n", "en-rp")
#: vowels (espeak-ng phoneme names) that accents trade for neighbours: a synthetic accent replaces a few vowels by
#: another of the same group (front close, front mid, open, back rounded, close back / diphthongs, central)
ACCENT_VOWEL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("i:", "I", "i", "I2", "eI"), ("E", "e@", "eI", "a"), ("a", "a#", "A@", "A:", "aI", "V"),
    ("0", "O:", "o@", "O@", "oU"), ("u:", "U", "oU", "aU"), ("@", "3:", "V", "@L", "a#"))
#: consonant processes of English accents (espeak-ng phoneme -> replacement; NULL drops it) that a synthetic accent
#: may apply: h-dropping, th-fronting, th-stopping, g-dropping (-ing as -in), t-glottalling
ACCENT_CONSONANT_RULES: tuple[tuple[str, str], ...] = (
    ("h", "NULL"), ("T", "f"), ("D", "v"), ("T", "t"), ("D", "d"), ("N", "n"), ("t", "?"))
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
    """Whether libespeak-ng can be loaded (the ``espeakng-loader`` package ships it with its voice data)."""
    try:
        _library()
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL, int]:
    """libespeak-ng from ``espeakng-loader``, initialised for synchronous synthesis; (library, sample rate).

    Raises:
        RuntimeError: :data:`NO_SYNTHESISER`, when the package or its library is missing.
    """
    try:
        import espeakng_loader
    except ImportError:
        raise RuntimeError(NO_SYNTHESISER) from None
    try:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path()
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"{NO_SYNTHESISER} ({e})") from None
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_ng_SetVoiceByFile.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
    if sample_rate <= 0:
        raise RuntimeError(f"{NO_SYNTHESISER} (espeak_Initialize failed with {data})")
    lib.espeak_SetSynthCallback(_on_samples)
    return lib, sample_rate


class _VoiceSpec(ctypes.Structure):
    """espeak_VOICE (speak_lib.h): voice properties to select by, here the language only."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_chunks: list[bytes] = []  # 16-bit samples handed over by libespeak-ng (in the forked child only)


@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
def _on_samples(wav, n: int, events) -> int:
    if n > 0:
        _chunks.append(ctypes.string_at(wav, 2 * n))
    return 0  # 0 = go on


def espeak_wave(text: str, *, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """Speak ``text`` with libespeak-ng as ``espeak-ng -v VOICE -s SPEED -p PITCH -w out.wav -- TEXT`` does.

    libespeak-ng keeps state between utterances (its pitch flutter phase, its noise generator), so a
    clip would depend on every clip spoken before it in the process. Each clip is therefore spoken in
    a forked child of the process that initialised the library and never speaks itself: every clip
    starts from the same fresh state, as each run of the ``espeak-ng`` program does, and is the same
    whatever was spoken before.

    Returns:
        (samples (T,) int16 mono, sample rate) -- libespeak-ng's own rate (22050 Hz).

    Raises:
        RuntimeError: no synthesiser (:data:`NO_SYNTHESISER`), or it failed (the voice is named).
    """
    with _FORK_LOCK:  # one thread at a time initialises the library (once) and forks
        lib, sample_rate = _library()
        read_end, write_end = os.pipe()
        pid = os.fork()
    if pid == 0:  # the child: speak, send the samples, exit without running the parent's cleanup
        status = 1
        try:
            os.close(read_end)
            status = _speak_into(lib, text, voice, speed, pitch, write_end)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not payload:
        raise RuntimeError(f"libespeak-ng failed for voice {voice!r}: "
                           f"{payload.decode(errors='replace') or 'no samples'}")
    return np.frombuffer(payload, dtype="<i2").copy(), sample_rate


def _speak_into(lib: ctypes.CDLL, text: str, voice: str, speed: int, pitch: int, fd: int) -> int:
    """(In the forked child.) Synthesise and write the samples to ``fd``; an error message instead on failure.
    Returns the exit status."""
    with os.fdopen(fd, "wb") as out:
        if os.sep in voice:  # a voice file (write_accent), as the espeak-ng program reads -v PATH[+VARIANT]
            chosen = lib.espeak_ng_SetVoiceByFile(voice.encode()) == 0
        else:
            chosen = lib.espeak_SetVoiceByName(voice.encode()) == 0 or lib.espeak_SetVoiceByProperties(
                ctypes.byref(_VoiceSpec(languages=voice.encode()))) == 0  # the espeak-ng program's fallback
        if not chosen:
            out.write(b"unknown voice")
            return 2
        lib.espeak_SetParameter(_ESPEAK_RATE, speed, 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
        raw = text.encode()
        if lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _SYNTH_FLAGS, None, None) != 0:
            out.write(b"espeak_Synth failed")
            return 3
        lib.espeak_Synchronize()
        out.write(b"".join(_chunks))
    return 0


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


def add_noise(wave: np.ndarray, snr_db: float, rng: random.Random, *, power: float | None = None) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` relative to the mean power of ``wave``.

    Args:
        wave: (T,) float signal.
        snr_db: 10 * log10(P_signal / P_noise).
        rng: random source (seeds the noise, so the clip is deterministic).
        power: P_signal (default: the mean power of ``wave``; give the speech's own when ``wave`` is padded
            with silence, so the silence does not lower the noise).
    """
    if power is None:
        power = float(np.mean(wave.astype(np.float64) ** 2))
    sigma = np.sqrt(power / 10 ** (snr_db / 10))
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, size=wave.shape)
    return (wave + noise).astype(np.float32)


def synthesize(text: str, path: str | Path, *, voice: str, speed: int, pitch: int, snr_db: float,
               rng: random.Random, silence: tuple[float, float] = (0.0, 0.0)) -> Path:
    """Speak ``text`` with libespeak-ng (:func:`espeak_wave`) and write a 16 kHz mono 16-bit PCM wav with
    added noise.

    Args:
        text: what to say.
        path: output .wav path (parent folders are created).
        voice: espeak-ng voice name, e.g. "en-gb+f2".
        speed: words per minute.
        pitch: espeak-ng pitch, 0..99.
        snr_db: signal-to-noise ratio of the added white noise.
        rng: random source for the noise.
        silence: seconds of silence added before and after the speech (the noise covers them too, at the
            speech's SNR). espeak-ng starts speaking within 40 ms; other engines and microphones leave
            0.2 s or more, which a recogniser trained only on espeak-ng's clips hears as words.

    Raises:
        RuntimeError: no synthesiser (:data:`NO_SYNTHESISER`), or it failed for this voice.
    """
    samples, sr = espeak_wave(text, voice=voice, speed=speed, pitch=pitch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = samples.astype(np.float32) / 32768.0  # what soundfile reads from the program's 16-bit wav
    wave = resample(wave, sr, SAMPLE_RATE)  # (T',)
    power = float(np.mean(wave.astype(np.float64) ** 2))
    wave = np.pad(wave, [round(max(0.0, t) * SAMPLE_RATE) for t in silence])  # (T'',)
    wave = np.clip(add_noise(wave, snr_db, rng, power=power), -1.0, 1.0)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return path


def speak(text: str, path: str | Path, *, split: str, rng: random.Random,
          silence: tuple[float, float] = (0.0, 0.0), voice: str | None = None) -> tuple[Path, VoiceParams]:
    """Synthesize ``text`` with a voice, speed, pitch and SNR drawn for ``split``.

    Args:
        text: what to say.
        path: output .wav path.
        split: decides the voice pool (held-out voices for "test").
        rng: random source for the voice parameters and the noise.
        silence: seconds of silence before and after the speech (:func:`synthesize`).
        voice: speak with this voice instead of the drawn one (speed, pitch and SNR are drawn as ever), e.g. a
            synthetic accent (:func:`write_accent`) with a "+variant".
    """
    params = sample_voice(rng, split)
    if voice is not None:
        params = VoiceParams(voice, params.speed, params.pitch, params.snr_db)
    return synthesize(text, path, voice=params.voice, speed=params.speed, pitch=params.pitch,
                      snr_db=params.snr_db, rng=rng, silence=silence), params


def write_accent(path: str | Path, rng: random.Random, consonants: int = 0) -> Path:
    """Write an espeak-ng voice file of a synthetic English accent and return its path, which
    :func:`synthesize` takes as a voice name (optionally with a "+variant").

    espeak-ng's accents are voice files (espeak-ng-data/lang/gmw) that differ in their phoneme table, vowel
    ``replace`` rules, ``stressLength`` and formant scaling. A synthetic accent draws each of them: one of the
    training accents' tables (:data:`TRAIN_PHONEME_TABLES`), 1-4 vowels each replaced by a neighbour of its
    :data:`ACCENT_VOWEL_GROUPS` group (everywhere, or in unstressed syllables only), the 8 stress lengths of an
    American voice scaled by 0.8-1.2 each, the first three formants' frequencies scaled by 0.92-1.08 and, with
    ``consonants`` k > 0, 0-k consonant processes of :data:`ACCENT_CONSONANT_RULES` (everywhere, or at the end of
    a word only). A recogniser trained on many such accents cannot rely on any one accent's vowels or consonants
    (the held-out test accents are espeak-ng's own, whose files are never read here).

    Args:
        path: where to write the voice file (parent folders are created): lower case and at most 50 characters,
            because libespeak-ng lower-cases a voice file's name and copies it, variant included, into 60 bytes.
        rng: random source of the accent.
        consonants: at most this many consonant processes (0: vowels only; the draws before them are the same
            for every k, so k = 0 writes the files it always wrote).

    Raises:
        ValueError: ``path`` has upper-case letters or is longer than 50 characters, or ``consonants`` is negative.
    """
    if consonants < 0:
        raise ValueError(f"write_accent: consonants must be >= 0, got {consonants}")
    if str(path) != str(path).lower() or len(str(path)) > 50:
        raise ValueError(f"accent voice file {str(path)!r} must be lower case and at most 50 characters "
                         "(libespeak-ng lower-cases the name and reads at most 60 bytes of it)")
    stress = (round(b * rng.uniform(0.8, 1.2)) for b in (140, 120, 190, 170, 0, 0, 255, 300))  # en-US's, scaled
    lines = ["name mmdiff synthetic accent", "language en", f"phonemes {rng.choice(TRAIN_PHONEME_TABLES)}",
             "stressLength " + " ".join(map(str, stress))]
    for _ in range(rng.randint(1, 4)):
        group = rng.choice(ACCENT_VOWEL_GROUPS)
        old, new = rng.sample(group, 2)
        lines.append(f"replace {rng.choice(('00', '03'))} {old} {new}")
    lines += [f"formant {k} {round(100 * rng.uniform(0.92, 1.08))} 100 100" for k in (1, 2, 3)]
    if consonants:
        rules = rng.sample(ACCENT_CONSONANT_RULES, min(rng.randint(0, consonants), len(ACCENT_CONSONANT_RULES)))
        lines += [f"replace {rng.choice(('00', '01'))} {old} {new}" for old, new in rules]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def accent_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder for :func:`write_accent`'s files, whose paths libespeak-ng can read (short, lower
    case): under the system's temporary folder, else under /tmp."""
    d = tempfile.gettempdir()
    return tempfile.TemporaryDirectory(prefix="mmdiff-acc-", dir=d if d == d.lower() and len(d) <= 16 else "/tmp")
