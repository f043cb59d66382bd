"""Word error rate and scene-caption scores (:mod:`mmdiff.evaluation.metrics`), checked by hand."""
import json
import random

import pytest

from mmdiff.data.questions import caption_json, caption_text
from mmdiff.data.scenes import sample_scene
from mmdiff.evaluation.metrics import caption_field_accuracy, score_json_caption, word_error_rate

TRUTH = [{"shape": "circle", "color": "red", "size": "small", "position": "center"},
         {"shape": "cross", "color": "blue", "size": "large", "position": "top left"}]


def test_word_error_rate_is_edit_distance_over_reference_words():
    assert word_error_rate(["a b c"], ["a x c"]) == pytest.approx(1 / 3)  # one substitution
    assert word_error_rate(["a b c", "d e"], ["a c", "d e f"]) == pytest.approx(2 / 5)  # a deletion, an insertion
    assert word_error_rate(["a b"], ["a b"]) == 0.0
    assert word_error_rate([""], ["x"]) == 1.0  # no reference words: errors over 1


def test_text_caption_field_accuracy():
    truth = "a small red circle at the top left, a large blue square in the center and a small red cross at the top"
    assert caption_field_accuracy(truth, truth) == 1.0
    two = "a small red circle at the top left and a small blue square in the center"
    assert caption_field_accuracy(two, truth) == 7 / 12
    assert caption_field_accuracy("a small red circle at the top left, nonsense", truth) == 4 / 16


def test_json_caption_field_accuracy_counts_an_unparsed_caption_as_one_unreadable_object():
    truth = json.dumps(TRUTH)
    assert caption_field_accuracy(truth, truth) == 1.0
    assert caption_field_accuracy('[{"shape": "circle"', truth) == 0 / 12
    odd = json.dumps([TRUTH[1], {**TRUTH[0], "position": 4}, "circle"])  # a number is no position, a string no object
    assert caption_field_accuracy(odd, truth) == 4 / 16


def test_score_json_caption_fields_parse_and_all_right():
    truth = json.dumps(TRUTH)

    def fields(pred: object) -> tuple[int, int]:
        score = score_json_caption(json.dumps(pred), truth)
        return score.fields_right, score.fields_total

    assert fields(TRUTH) == (8, 8)
    assert fields([{**TRUTH[0], "color": "blue"}, {**TRUTH[1], "position": "center"}]) == (3, 12)  # repeated position
    assert fields("nope") == (0, 8)  # parses, but holds no objects
    exact = score_json_caption(json.dumps([dict(reversed(list(o.items()))) for o in TRUTH]), truth)  # key order is free
    assert exact.parsed and exact.all_right and exact.value == TRUTH
    swapped = score_json_caption(json.dumps(TRUTH[::-1]), truth)  # every field right, objects out of reading order
    assert swapped.parsed and not swapped.all_right and (swapped.fields_right, swapped.fields_total) == (8, 8)
    torn = score_json_caption('[{"shape": "circle"', truth)
    assert (torn.parsed, torn.value, torn.all_right, torn.fields_right, torn.fields_total) == (False, None, False, 0, 8)


def test_generated_captions_score_perfectly_against_themselves():
    """The text parser reads every caption the generator writes (sizes, colours, shapes, all positions)."""
    rng = random.Random(0)
    for _ in range(50):
        scene = sample_scene(rng, "test")
        text, js = caption_text(scene), caption_json(scene)
        assert caption_field_accuracy(text, text) == 1.0
        assert caption_field_accuracy(js, js) == 1.0
        assert score_json_caption(js, js).all_right
