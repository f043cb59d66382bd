"""Synthetic English accents for the speech path's training clips (issue #22): espeak-ng voice files drawn from
the training accents' phoneme tables with vowel shifts, read by libespeak-ng, and the recipe option using them."""
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mmdiff.data.speech import (ACCENT_CONSONANT_RULES, ACCENT_VOWEL_GROUPS, HELDOUT_VOICES, TRAIN_ACCENTS,
                                TRAIN_PHONEME_TABLES, espeak_wave, write_accent)
from mmdiff.training import banks
from mmdiff.training.recipe import TrainConfig

from test_audio_top_layers import plain_and_changed_banks


@pytest.fixture
def short_dir():
    """A folder whose paths libespeak-ng can read (lower case, short), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="mmt-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


def parse(path: Path) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        if not line.split():
            continue
        key, *rest = line.split()
        out.setdefault(key, []).append(rest)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_an_accent_is_a_training_table_with_neighbouring_vowel_shifts(short_dir, seed):
    f = parse(write_accent(short_dir / "acc", random.Random(seed)))
    assert f["language"] == [["en"]]
    assert f["phonemes"][0][0] in TRAIN_PHONEME_TABLES  # never a held-out accent's (en-sc, en-wm, en-us-nyc)
    assert 1 <= len(f["replace"]) <= 4
    for flags, old, new in f["replace"]:
        assert flags in ("00", "03") and old != new
        assert any(old in g and new in g for g in ACCENT_VOWEL_GROUPS), (old, new)
    lengths = [int(x) for x in f["stressLength"][0]]
    assert len(lengths) == 8 and lengths[4] == lengths[5] == 0
    assert 112 <= lengths[0] <= 168 and 240 <= lengths[7] <= 360
    assert [k for k, *_ in f["formant"]] == ["1", "2", "3"]
    assert all(92 <= int(freq) <= 108 for _, freq, _, _ in f["formant"])


@pytest.mark.parametrize("seed", range(20))
def test_consonant_processes_follow_the_same_draws(short_dir, seed):
    """With consonants=k the file is the vowels-only file of the same seed plus 0-k consonant rules."""
    plain = write_accent(short_dir / "plain", random.Random(seed)).read_text().splitlines()
    lines = write_accent(short_dir / "cons", random.Random(seed), consonants=2).read_text().splitlines()
    assert lines[:len(plain)] == plain
    extra = [line.split() for line in lines[len(plain):]]
    assert len(extra) <= 2 and len({tuple(e[2:]) for e in extra}) == len(extra)
    for key, flags, old, new in extra:
        assert key == "replace" and flags in ("00", "01") and (old, new) in ACCENT_CONSONANT_RULES


def test_consonant_processes_are_drawn_up_to_k(short_dir):
    counts = {len(write_accent(short_dir / "c", random.Random(s), consonants=2).read_text().split("replace")) - 1
              - len(write_accent(short_dir / "p", random.Random(s)).read_text().split("replace")) + 1
              for s in range(40)}
    assert counts == {0, 1, 2}
    with pytest.raises(ValueError, match="consonants must be >= 0"):
        write_accent(short_dir / "c", random.Random(0), consonants=-1)


@pytest.mark.needs_espeak
@pytest.mark.parametrize("old, new, word", [("h", "NULL", "how"), ("T", "f", "three"), ("N", "n", "thing")])
def test_libespeak_ng_applies_a_consonant_process(short_dir, old, new, word):
    base = "name t\nlanguage en\nphonemes en-us\n"
    (short_dir / "plain").write_text(base)
    (short_dir / "cons").write_text(base + f"replace 00 {old} {new}\n")
    a, _ = espeak_wave(word, voice=str(short_dir / "plain"), speed=160, pitch=50)
    b, _ = espeak_wave(word, voice=str(short_dir / "cons"), speed=160, pitch=50)
    c, _ = espeak_wave("red", voice=str(short_dir / "cons"), speed=160, pitch=50)
    d, _ = espeak_wave("red", voice=str(short_dir / "plain"), speed=160, pitch=50)
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert np.array_equal(c, d)  # a word without that consonant is spoken alike


def test_accents_differ_and_repeat_with_their_seed(short_dir):
    texts = [write_accent(short_dir / f"a{k}", random.Random(k)).read_text() for k in range(10)]
    assert len(set(texts)) == 10
    assert write_accent(short_dir / "again", random.Random(3)).read_text() == texts[3]


@pytest.mark.parametrize("name", ["Accent", "x" * 60])
def test_a_path_libespeak_ng_cannot_read_is_refused(name):
    with pytest.raises(ValueError, match="must be lower case and at most 50 characters"):
        write_accent(Path("/tmp") / name, random.Random(0))


@pytest.mark.needs_espeak
def test_libespeak_ng_speaks_an_accent_file_and_its_vowel_shift_changes_the_word(short_dir):
    """A voice file path, with or without a variant, is a voice; its replace rule changes the words with that
    vowel only ("blue" has u:, "red" has none)."""
    base = "name t\nlanguage en\nphonemes en-us\n"
    (short_dir / "plain").write_text(base)
    (short_dir / "shift").write_text(base + "replace 00 u: aU\n")
    for word, changes in (("blue", True), ("red", False)):
        a, _ = espeak_wave(word, voice=str(short_dir / "plain"), speed=160, pitch=50)
        b, _ = espeak_wave(word, voice=str(short_dir / "shift"), speed=160, pitch=50)
        assert (len(a) != len(b) or not np.array_equal(a, b)) == changes, word
    w, _ = espeak_wave("blue", voice=str(short_dir / "shift") + "+m3", speed=160, pitch=50)
    assert len(w) > 0


@pytest.mark.needs_espeak
def test_the_bank_speaks_the_chosen_share_with_synthetic_accents(monkeypatch):
    voices = []

    def spy(text, path, *, voice=None, **kw):
        voices.append(voice)
        return speak(text, path, voice=voice, **kw)

    speak = banks.speak
    monkeypatch.setattr(banks, "speak", spy)
    plain, accented = plain_and_changed_banks(accents=(2, 1.0))
    assert voices[:3] == [None] * 3  # the plain bank: split's voices
    assert all(v.split("+")[0].rsplit("/", 1)[1] in ("a0", "a1") for v in voices[3:])
    assert [q.question for q in accented.qas] == [q.question for q in plain.qas]
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(plain.mels, accented.mels))


@pytest.mark.needs_espeak
def test_the_tables_are_the_training_accents_and_none_is_a_held_out_accents():
    """Read from espeak-ng's own voice files: the held-out accents' phoneme tables are never drawn."""
    import espeakng_loader

    files = {}  # a voice file's own language (its first) -> that file
    for path in (Path(espeakng_loader.get_data_path()) / "lang" / "gmw").glob("en*"):
        f = parse(path)
        files[f["language"][0][0].lower()] = f

    def table(accent: str) -> str:
        return files[accent]["phonemes"][0][0] if "phonemes" in files[accent] else "en"

    assert set(TRAIN_PHONEME_TABLES) == {table(a) for a in TRAIN_ACCENTS}
    held_out = {table(v.partition("+")[0]) for v in HELDOUT_VOICES}
    assert len(held_out) == 3 and not held_out & set(TRAIN_PHONEME_TABLES)


@pytest.mark.parametrize("bad", [[0, 0.5], [10, 0], [10, 1.5], [2.5, 0.5], [10], [10, 0.5, -1], [10, 0.5, 1.5],
                                 [10, 0.5, 1, 1]])
def test_synthetic_accents_are_checked(bad):
    with pytest.raises(ValueError, match=r"synthetic_accents .* must be \[n, share\] or \[n, share, k\]"):
        TrainConfig(out="x", model={}, stages=[], synthetic_accents=bad)
    assert TrainConfig(out="x", model={}, stages=[], synthetic_accents=[200, 0.5]).synthetic_accents == (200, 0.5)
    assert TrainConfig(out="x", model={}, stages=[], synthetic_accents=[200, 0.5, 2]).synthetic_accents == (200, 0.5, 2)
