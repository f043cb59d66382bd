"""Tests of the synthetic world: scenes, rendering, question answers (recomputed independently),
splits, the JSONL writer / reader, ``mmdiff data`` and espeak-ng speech."""
from __future__ import annotations

import argparse
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmdiff.data import cli as data_cli
from mmdiff.data import dataset, speech
from mmdiff.data.dataset import Row, RowError, iter_examples, read_rows, write_split
from mmdiff.data.questions import QUESTION_TYPES, ask, caption_json, caption_text, questions_for
from mmdiff.data.scenes import (
    CELL_PX,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    cell_labels,
    render,
    sample_scene,
)


def scenes(n: int, split: str = "train", seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- scenes and rendering -------------------------------------------------------------------------

def test_scene_sampling_is_deterministic_from_the_seed() -> None:
    a, b = random.Random(7), random.Random(7)
    for _ in range(20):
        sa, sb = sample_scene(a, "val"), sample_scene(b, "val")
        assert sa == sb
        assert png_bytes(render(sa, a)) == png_bytes(render(sb, b))
    assert scenes(20, seed=1) != scenes(20, seed=2)


def test_scenes_have_1_to_6_objects_in_distinct_cells() -> None:
    sampled = scenes(300)
    for s in sampled:
        cells = [o.cell for o in s.objects]
        assert 1 <= len(cells) <= 6 and len(set(cells)) == len(cells)
        assert all(200 <= c <= 255 for c in s.background)
    assert {len(s.objects) for s in sampled} == set(range(1, 7))


def test_scene_rejects_shared_cells_and_unknown_attributes() -> None:
    with pytest.raises(ValueError, match="share a cell"):
        Scene((Obj("circle", "red", "small", 1, 1), Obj("square", "blue", "large", 1, 1)), (255, 255, 255))
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Obj("circle", "pink", "small", 0, 0)
    with pytest.raises(ValueError, match="outside the 3x3 grid"):
        Obj("circle", "red", "small", 3, 0)


def test_obj_properties() -> None:
    o = Obj("circle", "red", "small", 2, 1)
    assert (o.cell, o.position) == (7, "bottom center")
    assert o.describe() == "red circle" and o.describe(with_size=True) == "small red circle"


def test_rendered_objects_stay_inside_their_cells() -> None:
    """Every non-background pixel lies fully inside an occupied cell; empty cells are pure background."""
    rng = random.Random(3)
    for scene in scenes(150, seed=3):
        pixels = np.asarray(render(scene, rng)).astype(int)  # (64, 64, 3)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        foreground = (pixels != np.array(scene.background)).any(axis=-1)  # (64, 64)
        ys, xs = np.nonzero(foreground)
        rows, cols = ((ys + 0.5) // CELL_PX).astype(int), ((xs + 0.5) // CELL_PX).astype(int)
        occupied = {(o.row, o.col) for o in scene.objects}
        assert set(zip(rows.tolist(), cols.tolist())) == occupied  # every object is visible, nothing else
        # the whole pixel [x, x+1) lies inside its cell [c * CELL_PX, (c + 1) * CELL_PX]
        assert (xs >= cols * CELL_PX).all() and (xs + 1 <= (cols + 1) * CELL_PX).all()
        assert (ys >= rows * CELL_PX).all() and (ys + 1 <= (rows + 1) * CELL_PX).all()


def test_large_objects_are_bigger_than_small_ones() -> None:
    scene = Scene((Obj("square", "blue", "small", 0, 0), Obj("square", "blue", "large", 2, 2)), (255, 255, 255))
    fg = (np.asarray(render(scene)).astype(int) < 250).any(axis=-1)
    half = IMAGE_SIZE // 2
    small, large = fg[:half, :half].sum(), fg[half:, half:].sum()
    assert 40 < small < 100 and 180 < large < 300  # ~8x8 and ~15x15 pixels


def test_cell_labels_match_the_scene() -> None:
    scene = Scene((Obj("cross", "brown", "large", 0, 2), Obj("circle", "red", "small", 1, 1)), (230, 230, 230))
    labels = cell_labels(scene)
    assert labels["shape"] == [0, 0, SHAPES.index("cross") + 1, 0, SHAPES.index("circle") + 1, 0, 0, 0, 0]
    assert labels["colour"] == [0, 0, COLOURS.index("brown") + 1, 0, COLOURS.index("red") + 1, 0, 0, 0, 0]
    assert labels["size"] == [0, 0, 2, 0, 1, 0, 0, 0, 0]


def test_splits_are_disjoint_by_fingerprint() -> None:
    by_split = {split: scenes(300, split, seed=5) for split in ("train", "val", "test")}
    prints = {split: {s.fingerprint() for s in ss} for split, ss in by_split.items()}
    assert all(s.split() == split for split, ss in by_split.items() for s in ss)
    assert not prints["train"] & prints["val"] and not prints["train"] & prints["test"]
    assert not prints["val"] & prints["test"]
    s = by_split["test"][0]
    assert Scene(s.objects, (201, 202, 203)).fingerprint() == s.fingerprint()  # background excluded
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sample_scene(random.Random(0), "dev")


# --- questions: every answer recomputed from the scene by an independent parser ------------------

_PLURAL_SHAPES = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
_OFFSETS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def select(scene: Scene, noun: str) -> list[Obj]:
    """Objects matching a noun phrase like "small red circle", "blue objects", "crosses"."""
    want: dict[str, str] = {}
    for word in noun.split():
        if word in SIZES:
            want["size"] = word
        elif word in COLOURS:
            want["colour"] = word
        elif word in SHAPES or word in _PLURAL_SHAPES:
            want["shape"] = _PLURAL_SHAPES.get(word, word)
        else:
            assert word in ("object", "objects"), f"unexpected word {word!r} in {noun!r}"
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in want.items())]


def the(scene: Scene, noun: str) -> Obj:
    matches = select(scene, noun)
    assert len(matches) == 1, f"{noun!r} does not pick exactly one object"
    return matches[0]


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def truth(scene: Scene, question: str) -> str:
    """The answer to ``question`` about ``scene``, computed without mmdiff.data.questions."""
    if m := re.fullmatch(r"(.+\?) answer: (.+)\. is that right\?", question):
        return yes(truth(scene, m[1]) == m[2])
    if m := re.fullmatch(r"what (color|shape|size) is the (.+)\?", question):
        attr = "colour" if m[1] == "color" else m[1]
        value = getattr(the(scene, m[2]), attr)
        assert value not in m[2].split(), "the description gives the answer away"
        return value
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        return yes(bool(select(scene, m[1])))
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return str(len(select(scene, m[1])))
    if m := re.fullmatch(r"where is the (.+)\?", question):
        return POSITIONS[the(scene, m[1]).row * GRID + the(scene, m[1]).col]
    if m := re.fullmatch(r"what is directly (left of|right of|above|below) the (.+)\?", question):
        o = the(scene, m[2])
        r, c = o.row + _OFFSETS[m[1]][0], o.col + _OFFSETS[m[1]][1]
        assert 0 <= r < GRID and 0 <= c < GRID, "asked about a cell outside the grid"
        other = [x for x in scene.objects if (x.row, x.col) == (r, c)]
        return f"{other[0].colour} {other[0].shape}" if other else "nothing"
    if m := re.fullmatch(r"is the (.+?) (left of|right of|above|below) the (.+)\?", question):
        a, b = the(scene, m[1]), the(scene, m[3])
        dr, dc = _OFFSETS[m[2]]
        return yes((a.row - b.row) * dr > 0 if dr else (a.col - b.col) * dc > 0)
    if m := re.fullmatch(r"are there (more|fewer) (.+) than (.+)\?", question):
        na, nb = len(select(scene, m[2])), len(select(scene, m[3]))
        return yes(na > nb if m[1] == "more" else na < nb)
    if m := re.fullmatch(r"are there as many (.+) as (.+)\?", question):
        return yes(len(select(scene, m[1])) == len(select(scene, m[2])))
    if question == "describe the image.":
        parts = [f"a {o.size} {o.colour} {o.shape} " + ("in the center" if o.cell == 4 else f"at the {POSITIONS[o.cell]}")
                 for o in sorted(scene.objects, key=lambda o: (o.row, o.col))]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if question == "describe the image in json.":
        return json.dumps([{"shape": o.shape, "color": o.colour, "size": o.size, "position": POSITIONS[o.cell]}
                           for o in sorted(scene.objects, key=lambda o: o.cell)])
    raise AssertionError(f"question matches no template: {question!r}")


@pytest.fixture(scope="module")
def asked() -> list[tuple[Scene, object]]:
    rng = random.Random(11)
    out = []
    for scene in scenes(250, seed=11):
        out += [(scene, qa) for qa in questions_for(scene, rng, per_type=2)]
    return out


def test_every_answer_matches_the_scene(asked) -> None:
    assert {qa.type for _, qa in asked} == set(QUESTION_TYPES)
    for scene, qa in asked:
        assert qa.question == qa.question.lower() and len(qa.answers) == 1
        assert qa.answers[0] == truth(scene, qa.question), qa


def test_yes_no_families_are_balanced(asked) -> None:
    for qtype in ("existence", "comparison", "verify"):
        answers = Counter(qa.answers[0] for _, qa in asked if qa.type == qtype)
        assert set(answers) == {"yes", "no"}
        assert 0.35 < answers["yes"] / sum(answers.values()) < 0.65, (qtype, answers)
    pairs = Counter(qa.answers[0] for _, qa in asked if qa.type == "relation" and qa.question.startswith("is the"))
    assert 0.35 < pairs["yes"] / sum(pairs.values()) < 0.65, pairs


def test_count_answers_do_not_collapse_to_0_and_1(asked) -> None:
    counts = Counter(qa.answers[0] for _, qa in asked if qa.type == "count")
    assert set(counts) <= {str(i) for i in range(7)} and {"2", "3", "4"} <= set(counts)
    assert sum(v for k, v in counts.items() if int(k) >= 2) / sum(counts.values()) > 0.35, counts


def test_relation_questions_mix_objects_and_nothing(asked) -> None:
    answers = [qa.answers[0] for _, qa in asked if qa.question.startswith("what is directly")]
    share = answers.count("nothing") / len(answers)
    assert 0.1 < share < 0.45, share


def test_caption_json_lists_every_object() -> None:
    for scene in scenes(30, seed=4):
        items = json.loads(caption_json(scene))
        assert [list(d) for d in items] == [["shape", "color", "size", "position"]] * len(scene.objects)
        assert {(d["shape"], d["color"], d["size"], d["position"]) for d in items} == {
            (o.shape, o.colour, o.size, o.position) for o in scene.objects}
        assert caption_text(scene).count(" at the ") + caption_text(scene).count(" in the center") == len(scene.objects)


def test_question_generation_is_deterministic() -> None:
    s = scenes(1, seed=9)[0]
    assert questions_for(s, random.Random(1)) == questions_for(s, random.Random(1))


def test_ask_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="Unknown question type 'colour'; known: attribute, caption"):
        ask(scenes(1)[0], random.Random(0), "colour")


def test_single_object_scene_still_gets_answerable_questions() -> None:
    scene = Scene((Obj("triangle", "green", "large", 0, 0),), (240, 240, 240))
    rng = random.Random(0)
    for _ in range(20):
        for qa in questions_for(scene, rng):
            assert qa.answers[0] == truth(scene, qa.question)
    assert ask(scene, rng, "position").answers == ["top left"]


# --- datasets -------------------------------------------------------------------------------------

def test_iter_examples_is_deterministic_and_endless() -> None:
    a, b = iter_examples("train", 3), iter_examples("train", 3)
    for _ in range(12):
        (sa, ia, qa), (sb, ib, qb) = next(a), next(b)
        assert sa == sb and qa == qb and png_bytes(ia) == png_bytes(ib)
        assert sa.split() == "train" and ia.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert next(iter_examples("train", 4))[0] != next(iter_examples("train", 3))[0]


def data_args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    data_cli.add_arguments(parser)
    return parser.parse_args(["--out", str(out), "--quiet", *extra])


def test_mmdiff_data_writes_a_valid_jsonl(tmp_path: Path, capsys) -> None:
    assert data_cli.run(data_args(tmp_path / "a", "--split", "val", "--n", "12", "--seed", "2")) == 0
    out = capsys.readouterr().out
    assert "wrote 12 val rows" in out and str(tmp_path / "a" / "data.jsonl") in out
    rows = list(read_rows(tmp_path / "a" / "data.jsonl"))
    assert len(rows) == 12 and all(isinstance(r, Row) for r in rows)
    assert len({r.id for r in rows}) == 12 and len({r.type for r in rows}) >= 4
    for line in (tmp_path / "a" / "data.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"id", "image", "question", "answers", "type"}
    from PIL import Image
    assert Image.open(rows[0].image).size == (IMAGE_SIZE, IMAGE_SIZE)
    # deterministic from (split, seed)
    write_split(tmp_path / "b", split="val", n=12, seed=2, progress=False)
    assert (tmp_path / "a" / "data.jsonl").read_text() == (tmp_path / "b" / "data.jsonl").read_text()
    write_split(tmp_path / "c", split="val", n=12, seed=3, progress=False)
    assert (tmp_path / "a" / "data.jsonl").read_text() != (tmp_path / "c" / "data.jsonl").read_text()


def test_write_split_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be positive"):
        write_split(tmp_path, split="train", n=0, seed=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        write_split(tmp_path, split="dev", n=3, seed=0)


def test_a_crash_leaves_no_data_file(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_render(scene, rng=None):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return render(scene, rng)

    monkeypatch.setattr(dataset, "render", failing_render)
    with pytest.raises(RuntimeError, match="boom"):
        write_split(tmp_path, split="train", n=40, seed=0, progress=False)
    assert not (tmp_path / "data.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_rows_reports_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    good = {"id": "ok", "image": "images/a.png", "question": "q?", "answers": ["yes"], "type": "existence"}
    lines = [
        json.dumps(good),
        '{"id": "broken", ',
        json.dumps({**good, "id": "noimg", "image": "images/missing.png"}),
        json.dumps({k: v for k, v in good.items() if k != "question"} | {"id": "noq"}),
        json.dumps({**good, "id": "noans", "answers": []}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({**good, "id": "noaudio", "audio": "audio/x.wav"}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    rows = list(read_rows(tmp_path / "data.jsonl"))
    assert isinstance(rows[0], Row) and rows[0].image == (tmp_path / "images" / "a.png").resolve()
    errors = {(e.line_no, e.id): e.reason for e in rows[1:]}
    assert all(isinstance(e, RowError) for e in rows[1:]) and len(errors) == 6
    assert errors[(2, None)].startswith("invalid JSON")
    assert "image file not found" in errors[(3, "noimg")]
    assert errors[(4, "noq")] == "neither 'question' nor 'audio'"
    assert "non-empty list" in errors[(5, "noans")]
    assert "expected a JSON object" in errors[(7, None)]
    assert "audio file not found" in errors[(8, "noaudio")]


def test_read_rows_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        read_rows(tmp_path / "nope.jsonl")


# --- speech ---------------------------------------------------------------------------------------

needs_espeak = pytest.mark.needs_espeak  # tests/conftest.py skips these without espeak-ng


def test_voice_pools_are_disjoint_and_test_uses_heldout_voices() -> None:
    assert len(speech.TRAIN_VOICES) >= 5 and len(speech.HELDOUT_VOICES) >= 2
    assert not set(speech.TRAIN_VOICES) & set(speech.HELDOUT_VOICES)
    heard = {part for v in speech.TRAIN_VOICES for part in v.split("+")}
    assert not heard & {part for v in speech.HELDOUT_VOICES for part in v.split("+")}  # no accent or variant shared
    rng = random.Random(0)
    test_voices = {speech.sample_voice(rng, "test").voice for _ in range(50)}
    train_voices = {speech.sample_voice(rng, "train").voice for _ in range(2000)}
    assert test_voices == set(speech.HELDOUT_VOICES) and train_voices == set(speech.TRAIN_VOICES)
    p = speech.sample_voice(rng, "val")
    assert 130 <= p.speed <= 190 and 30 <= p.pitch <= 70 and 15 <= p.snr_db <= 35


def test_missing_espeak_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    def missing():
        raise RuntimeError(speech.NO_SYNTHESISER)

    monkeypatch.setattr(speech, "_library", missing)
    with pytest.raises(RuntimeError, match="libespeak-ng not found"):
        speech.synthesize("hi", tmp_path / "x.wav", voice="en-us", speed=150, pitch=50, snr_db=20,
                          rng=random.Random(0))


def test_resample_keeps_a_tone() -> None:
    t = np.arange(22050) / 22050
    out = speech.resample(np.sin(2 * np.pi * 440 * t), 22050, 16000)  # 1 s of 440 Hz
    assert out.shape == (16000,) and out.dtype == np.float32
    assert np.argmax(np.abs(np.fft.rfft(out))) == 440 and abs(np.abs(out).max() - 1) < 0.01


@needs_espeak
def test_every_voice_exists_in_espeak() -> None:
    """libespeak-ng refuses an unknown language but quietly ignores an unknown variant: check its file."""
    import espeakng_loader

    variants = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    for voice in speech.TRAIN_VOICES + speech.HELDOUT_VOICES:
        language, _, variant = voice.partition("+")
        samples, rate = speech.espeak_wave("hi", voice=language, speed=150, pitch=50)
        assert rate == 22050 and samples.dtype == np.int16 and np.abs(samples).max() > 1000, voice
        assert not variant or (variants / variant).is_file(), voice


@needs_espeak
def test_each_clip_is_spoken_from_a_fresh_state() -> None:
    """libespeak-ng carries state between utterances; clips must not depend on what was spoken before."""
    kwargs = dict(voice="en-gb-x-gbclan+m3", speed=170, pitch=40)
    first, _ = speech.espeak_wave("what is directly left of the small cyan square?", **kwargs)
    speech.espeak_wave("how many red circles are there?", voice="en-us+f2", speed=150, pitch=50)
    again, _ = speech.espeak_wave("what is directly left of the small cyan square?", **kwargs)
    assert np.array_equal(first, again)


@needs_espeak
def test_synthesize_writes_16khz_mono_speech(tmp_path: Path) -> None:
    kwargs = dict(voice="en-gb+f2", speed=160, pitch=50, snr_db=25.0)
    path = speech.synthesize("how many red circles are there?", tmp_path / "q.wav", rng=random.Random(1), **kwargs)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    wave, _ = sf.read(path, dtype="float32")
    assert 0.8 < len(wave) / 16000 < 5 and np.sqrt(np.mean(wave**2)) > 0.02
    again = speech.synthesize("how many red circles are there?", tmp_path / "r.wav", rng=random.Random(1), **kwargs)
    assert np.array_equal(sf.read(again)[0], sf.read(path)[0])
    with pytest.raises(RuntimeError, match="libespeak-ng failed for voice 'xx-nope': unknown voice"):
        speech.synthesize("hi", tmp_path / "bad.wav", voice="xx-nope", speed=150, pitch=50, snr_db=20,
                          rng=random.Random(0))


@needs_espeak
def test_synthesize_pads_noisy_silence_at_the_speechs_snr(tmp_path: Path) -> None:
    """silence=(lead, trail) adds that much audio around the same speech; the noise in it has the level the
    speech's SNR gives (not lowered by the silence), and (0, 0) is the clip without padding."""
    kwargs = dict(voice="en-us+m3", speed=150, pitch=50, snr_db=20.0)
    text = "where is the blue cross?"
    plain, _ = sf.read(speech.synthesize(text, tmp_path / "a.wav", rng=random.Random(2), **kwargs), dtype="float32")
    same, _ = sf.read(speech.synthesize(text, tmp_path / "b.wav", rng=random.Random(2), silence=(0.0, 0.0), **kwargs),
                      dtype="float32")
    padded, _ = sf.read(speech.synthesize(text, tmp_path / "c.wav", rng=random.Random(2), silence=(0.4, 0.25), **kwargs),
                        dtype="float32")
    assert np.array_equal(plain, same)
    assert len(padded) - len(plain) == 0.65 * 16000
    clean, sr = speech.espeak_wave(text, voice="en-us+m3", speed=150, pitch=50)
    speech_power = np.mean(speech.resample(clean.astype(np.float32) / 32768.0, sr, 16000).astype(np.float64) ** 2)
    lead_rms = np.sqrt(np.mean(padded[: int(0.4 * 16000)].astype(np.float64) ** 2))
    assert lead_rms == pytest.approx(np.sqrt(speech_power / 10 ** 2), rel=0.1)  # 20 dB below the speech


@needs_espeak
def test_mmdiff_data_with_audio(tmp_path: Path) -> None:
    assert data_cli.run(data_args(tmp_path, "--split", "test", "--n", "16", "--seed", "1", "--audio")) == 0
    rows = list(read_rows(tmp_path / "data.jsonl"))
    assert all(isinstance(r, Row) for r in rows) and len(rows) == 16
    spoken = [r for r in rows if r.audio is not None]
    assert spoken and all(sf.info(r.audio).samplerate == 16000 for r in spoken)
    raw = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    for r, d in zip(rows, raw):
        if r.type == "asr":  # transcription: instruction + clip, no image
            assert r.question == dataset.ASR_QUESTION and r.audio is not None and r.image is None
            assert r.answers[0].endswith("?")
        elif r.audio is not None:  # a spoken question: no typed text, transcript kept
            assert r.question is None and d["transcript"].endswith("?") and r.image is not None
            assert r.type.startswith(dataset.SPOKEN_PREFIX)
            assert r.type[len(dataset.SPOKEN_PREFIX):] in dataset.SPOKEN_TYPES


def test_focus_cells_agree_with_answers():
    """The grounding targets name the cells the answer is computed from."""
    import random as _random

    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import sample_scene

    rng = _random.Random(5)
    for _ in range(200):
        scene = sample_scene(rng, "train")
        occupied = {o.cell for o in scene.objects}
        qa = ask(scene, rng, "count")
        assert len(qa.focus[0]) == int(qa.answers[0]) and set(qa.focus[0]) <= occupied
        qa = ask(scene, rng, "existence")
        assert (len(qa.focus[0]) > 0) == (qa.answers[0] == "yes")
        qa = ask(scene, rng, "position")
        if qa is not None:
            (cell,), = qa.focus
            assert scene.objects[[o.cell for o in scene.objects].index(cell)].position == qa.answers[0]
        qa = ask(scene, rng, "caption_json")
        assert set(qa.focus[0]) == occupied
        qa = ask(scene, rng, "relation")
        if qa is not None:  # group 3: the cells the relation selects
            region = set(qa.focus[2])
            if qa.answers[0] in ("yes", "no"):  # "is A rel B?": yes iff A's cell is in B's region
                assert (qa.focus[0][0] in region) == (qa.answers[0] == "yes")
                (b,), = [qa.focus[1]]
                assert b not in region
            else:  # "what is directly rel X?": the one neighbouring cell, empty iff the answer is nothing
                (cell,) = region
                assert (cell in occupied) == (qa.answers[0] != "nothing")
