"""Structure priors: template syntax, canvas and tokenisation, constrained slots, JSON schemas,
captioning (API, CLI) and the benchmark script, on a tiny random model with the world's tokenizer."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.data.questions import Filter, caption_json
from mmdiff.data.scenes import COLOURS, POSITIONS, SHAPES, SIZES, render, sample_scene, scene_schema
from mmdiff.sampling import DecodeConfig, SamplerConfig
from mmdiff.sampling.schema import is_valid, schema_to_template, validate
from mmdiff.sampling.structure import Slot, StructurePrior, Template
from mmdiff.special_tokens import SpecialIds
from mmdiff.tasks.captioning import caption
from mmdiff.tasks.prompts import COUNT_QUESTION

ROOT = Path(__file__).resolve().parents[1]
SCENE_FIELDS = {"shape": SHAPES, "color": COLOURS, "size": SIZES, "position": POSITIONS}
MIXED_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "n", "ok", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(world_tokenizer):
    """The real tokenizer recipe (as the trainer builds it): questions and answers of the world."""
    return world_tokenizer


def tiny_model(tok, **decoder):
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.decoder import preset
    from mmdiff.encoders.vision import preset as vision_preset
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    torch.manual_seed(0)
    cfg = ModelConfig(decoder=preset("tiny-test", vocab_size=len(tok), **decoder), vision=vision_preset("tiny-test"),
                      vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=32, out_dim=32))
    return MultimodalDiffusionLM(cfg, tok).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def image():
    return render(sample_scene(random.Random(1), "test"))


def hot(temperature=1.0, seed=0, **kw):
    return SamplerConfig(temperature=temperature, seed=seed, **kw)


# ------------------------------------------------------------------------------------------------
# syntax
# ------------------------------------------------------------------------------------------------
def test_parse_example_template_and_round_trip():
    text = '{"shape": "<mask:1>", "colour": "<mask:1-2>", "count": <mask:1>, "n": <digits:0-2>, "b": <enum:yes|no>}'
    t = Template.parse(text)
    assert str(t) == text
    assert t.slots == [Slot("mask", 1, 1, in_string=True), Slot("mask", 1, 2, in_string=True), Slot("mask", 1, 1),
                       Slot("digits", 0, 2), Slot("enum", values=("yes", "no"))]
    assert t.parts[0] == '{"shape": "' and t.parts[-1] == "}"
    assert Template.parse("a <maskless> <mask:2>").parts == ("a <maskless> ", Slot("mask", 2, 2))  # not a slot
    assert str(Template.free(5)) == "<mask:5>"


@pytest.mark.parametrize("text,message", [
    ("just fixed text", "has no slot"),
    ('{"a": "<mask:1>"', "unclosed '{' opened at position 0"),
    ('{"a": "<mask:1>"}}', "unbalanced '}' at position 17"),
    ('["a": <mask:1>}', "'}' at position 14 closes '[' opened at position 0"),
    ('{"a": "<mask:1>}', "unclosed quote opened at position 6"),
    ('{"a: <mask:1>}', "unclosed quote opened at position 1"),
    ("x <mask:5-2>", "slot <mask:5-2> at position 2: range start 5 > end 2"),
    ("x <mask:0>", "slot <mask:0> at position 2: length must be >= 1"),
    ("ab <mask:0-0>", "slot <mask:0-0> at position 3: range end must be >= 1"),
    ("x <mask:two>", "slot <mask:two> at position 2: expected a length n or a range a-b"),
    ("x <mask:1 y", "malformed slot at position 2"),
    ("xy <digits>", "malformed slot at position 3"),
    ("<enum:a|a>", "slot <enum:a|a> at position 0: repeated enum value"),
    ("<enum:|>", "slot <enum:|> at position 0: an enum needs at least one non-empty value"),
])
def test_bad_templates_name_the_position(text, message):
    with pytest.raises(ValueError, match=f"^.*{re.escape(message)}"):
        Template.parse(text)


def test_escaped_quote_and_braces_inside_strings_are_text():
    t = Template.parse(r'{"a": "x\" {[ <mask:1>"}')
    assert t.slots[0].in_string


# ------------------------------------------------------------------------------------------------
# canvas and tokenisation
# ------------------------------------------------------------------------------------------------
def test_to_canvas_places_fixed_tokens_masks_and_eos(tok):
    sp = SpecialIds.from_tokenizer(tok)
    t = Template.parse('{"shape": "<enum:circle|square>", "colour": "<mask:1-3>", "n": <digits:2>}')
    ids, spans = t.to_canvas(tok, sp.mask)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = enc('{"shape": "')
    assert ids[:len(head)] == head and ids[-1] == sp.eos
    assert [(s.width, s.required) for s in spans] == [(1, 1), (3, 1), (2, 2)]
    assert spans[0].options == ((enc("circle")[0],), (enc("square")[0],))
    masked = [i for i, x in enumerate(ids) if x == sp.mask]
    assert masked == [p for s in spans for p in range(s.start, s.stop)]
    assert len(t.to_canvas(tok, sp.mask, eos=False)[0]) == len(ids) - 1


def test_fixed_pieces_plus_values_tokenise_like_whole_caption_json(tok):
    """The model was trained on whole responses: the canvas of the scene template, filled with the
    values tokenised on their own, must equal the whole caption_json tokenised in one go."""
    sp = SpecialIds.from_tokenizer(tok)
    schema = scene_schema()
    for name, values in SCENE_FIELDS.items():  # every JSON value is one token in context: exact enum slots
        assert all(len(tok(f'{{"{name}": "{v}"}}', add_special_tokens=False)["input_ids"]) == 6 for v in values), name
    rng = random.Random(7)
    for _ in range(60):
        scene = sample_scene(rng, "test")
        whole = tok(caption_json(scene), add_special_tokens=False)["input_ids"] + [sp.eos]
        compiled = schema_to_template(schema, lengths={"$": len(scene.objects)})
        ids, spans = compiled.template.to_canvas(tok, sp.mask)
        truth = [getattr(o, "colour" if f == "color" else f) for o in scene.objects for f in SCENE_FIELDS]
        for span, value in zip(spans, truth, strict=True):
            ids[span.start:span.stop] = span.options[span.slot.values.index(value)]
        assert ids == whole
        prior = StructurePrior(compiled.template, tok)
        assert prior.fill(ids) == caption_json(scene)
        assert compiled.read(prior.values(ids)) == json.loads(caption_json(scene))


# ------------------------------------------------------------------------------------------------
# the strategy in the sampler
# ------------------------------------------------------------------------------------------------
def test_fixed_tokens_survive_every_step_and_slots_keep_their_lengths(tok, model, image):
    t = Template.parse('{"shape": "<mask:1>", "colour": "<mask:1-2>", "count": <digits:1-2>, "note": "<mask:3>"}')
    prior = StructurePrior(t, tok)
    fixed = prior.ids != prior.special.mask
    sp = prior.special
    for seed in range(6):
        events = []
        cfg = prior.sampler_config(hot(seed=seed, transfer="threshold" if seed % 2 else "schedule", threshold=0.3))
        res = model.generate(["describe the image."], images=[image], decode=DecodeConfig(sampler=cfg), strategies=[prior], callback=events.append)[0]
        assert events and len(events) == res.nfe
        for e in events:
            assert torch.equal(e.canvas[0][fixed], prior.ids[fixed])
        final = torch.tensor(res.tokens)
        assert torch.equal(final[fixed], prior.ids[fixed]) and (final != sp.mask).all()
        assert all(res.fixed_at[i] == -1 for i in fixed.nonzero().flatten().tolist())
        special = set(tok.all_special_ids)
        for span in prior.spans:
            seg = res.tokens[span.start:span.stop]
            content = [x for x in seg if x not in (sp.eos, sp.pad)]
            assert not special & set(seg[:span.required]), "EOS/PAD or special in a required position"
            assert not special & set(content)
            assert span.slot.min_len <= len(content) <= span.slot.max_len
        values = prior.values(res.tokens)
        assert values[2].isdigit()
        assert '"' not in values[0] + values[1] + values[3]


def test_canvas_length_must_match_template(tok, model, image):
    prior = StructurePrior(Template.free(4), tok)
    with pytest.raises(ValueError, match="canvas has 16 positions but the template needs 5"):
        model.generate(["describe the image."], images=[image], decode=DecodeConfig(sampler=SamplerConfig(gen_length=16)), strategies=[prior])


def test_multi_token_enum_narrows_to_consistent_values(tok):
    prior = StructurePrior(Template.parse("<enum:true|false>"), tok)
    sp, span = prior.special, prior.spans[0]
    assert (span.width, span.required) == (5, 4)  # t r u e / f a l s e, byte tokens in this world
    t_id = span.options[0][0]
    canvas = torch.full((1, prior.length), sp.mask)
    canvas[0, span.start] = t_id
    logits = prior.process_logits(torch.zeros(1, prior.length, len(tok)), _state(canvas, sp.mask))
    for i, token in enumerate(span.options[0]):
        assert (logits[0, span.start + i] > -1).nonzero().flatten().tolist() == [token]
    assert (logits[0, span.start + 4] > -1).nonzero().flatten().tolist() == sorted([sp.eos, sp.pad])


def _state(canvas, mask_id):
    from mmdiff.sampling import StepState

    return StepState(canvas, 0, 0, slice(0, canvas.shape[1]), mask_id)


def test_enum_values_are_resolved_and_digits_normalised(tok):
    prior = StructurePrior(Template.parse("<enum:true|false> <digits:1-2>"), tok)
    sp = prior.special
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    row = prior.ids.tolist()
    bool_span, num_span = prior.spans
    row[bool_span.start:bool_span.stop] = enc("t") + enc("a") + enc("l") + enc("s") + [sp.eos]  # fixed together
    row[num_span.start:num_span.stop] = enc("0") + enc("7")
    assert prior.values(row) == ["false", "7"]


# ------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------
def test_scene_schema_matches_the_world():
    schema = scene_schema()
    assert {k: tuple(v["enum"]) for k, v in schema["items"]["properties"].items()} == SCENE_FIELDS
    rng = random.Random(3)
    for _ in range(30):
        validate(json.loads(caption_json(sample_scene(rng, "test"))), schema)
    assert f"how many {Filter().noun(plural=True)} are there?" == COUNT_QUESTION


@pytest.mark.parametrize("data,message", [
    ({"shape": "circle"}, "$: expected an array, got dict"),
    ([], "$: 0 items, expected 1..6"),
    ([{"shape": "circle", "color": "pink", "size": "small", "position": "center"}], "$[0].color: 'pink' is not one"),
    ([{"shape": "circle", "color": "red", "size": "small"}], "$[0]: missing required field 'position'"),
    ([{"shape": "circle", "color": "red", "size": "small", "position": "center", "x": 1}], "unexpected field 'x'"),
])
def test_validator_names_the_data_path(data, message):
    assert not is_valid(data, scene_schema())
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(data, scene_schema())


def test_validator_types():
    assert is_valid({"name": "x", "n": 3, "ok": True, "tags": ["a"]}, MIXED_SCHEMA)
    assert not is_valid({"name": "x", "n": True, "ok": True, "tags": []}, MIXED_SCHEMA)  # bool is not an integer
    assert not is_valid({"name": "x", "n": 3, "ok": 1, "tags": []}, MIXED_SCHEMA)
    assert not is_valid({"name": "x", "n": 3, "ok": True, "tags": ["a"] * 4}, MIXED_SCHEMA)


@pytest.mark.parametrize("schema,message", [
    ({"type": "number"}, "schema at $: unsupported type 'number'"),
    ({"type": "array", "items": {"type": "object", "properties": {"w": {"type": "number"}}}},
     "schema at $[].w: unsupported type 'number'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
     "schema at $.n: unsupported keyword 'minimum'"),
    ({"type": "object", "properties": {"a": {"type": ["string", "null"]}}}, "schema at $.a: unsupported type"),
    ({"type": "object", "properties": {"a": {"enum": ["x"]}}}, "schema at $.a: missing 'type'"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required field 'a' is not in 'properties'"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 2}, "minItems 3 > maxItems 2"),
    ({"type": "string", "enum": ['say "hi"']}, "schema at $: enum value"),
])
def test_unsupported_schemas_name_the_field(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schema_to_template(schema)


def test_schema_template_layout_and_array_lengths():
    compiled = schema_to_template(MIXED_SCHEMA, string_tokens=4)
    assert str(compiled.template) == ('{"name": "<mask:1-4>", "n": <digits:1-2>, "ok": <enum:true|false>, '
                                      '"tags": ["<enum:a|b|>", "<enum:a|b|>", "<enum:a|b|>"]}')
    assert compiled.free_arrays == {"$.tags": (0, 3)}
    fixed = schema_to_template(MIXED_SCHEMA, lengths={"$.tags": 2})
    assert str(fixed.template).endswith('"tags": ["<enum:a|b>", "<enum:a|b>"]}') and not fixed.free_arrays
    with pytest.raises(ValueError, match=r"length 5 for the array at \$.tags is outside minItems 0..maxItems 3"):
        schema_to_template(MIXED_SCHEMA, lengths={"$.tags": 5})
    with pytest.raises(ValueError, match=r"lengths names \$.name, which is not an array"):
        schema_to_template(MIXED_SCHEMA, lengths={"$.name": 1})


def test_max_items_fallback_drops_empty_and_incomplete_items(tok):
    compiled = schema_to_template(scene_schema())  # no count: 6 items, the first required
    assert compiled.free_arrays == {"$": (1, 6)}
    slots = compiled.template.slots
    assert [s.values[-1] == "" for s in slots] == [False] * 4 + [True] * 20
    obj = ["circle", "red", "small", "top left"]
    values = obj + ["square", "blue", "large", "center"] + ["", "", "", ""] + ["cross", "", "small", "center"] \
        + ["", "", "", ""] + ["triangle", "green", "large", "bottom right"]
    data = compiled.read(values)
    assert [d["shape"] for d in data] == ["circle", "square", "triangle"]
    validate(data, scene_schema())


# ------------------------------------------------------------------------------------------------
# captioning
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("array_length", ["count", "max", 3])
def test_json_captions_always_validate(model, image, array_length):
    for seed in range(8):
        res = caption(model, image, schema=scene_schema(), decode=DecodeConfig(sampler=hot(seed=seed, temperature=1.5)), array_length=array_length)
        validate(res.data, scene_schema())
        assert json.loads(res.text) == res.data and res.nfe >= 1
        if array_length == 3:
            assert len(res.data) == 3
        assert (res.count is not None) == (array_length == "count")


def test_mixed_schema_captions_always_validate(model, image):
    for seed in range(8):
        res = caption(model, image, schema=MIXED_SCHEMA, decode=DecodeConfig(sampler=hot(seed=seed, temperature=2.0)), string_tokens=4)
        validate(res.data, MIXED_SCHEMA)
        assert 0 <= res.data["n"] <= 99 and len(res.data["name"]) > 0


def test_count_first_sizes_the_array_and_falls_back_to_max(model, image, monkeypatch):
    from mmdiff.tasks import captioning as structure

    monkeypatch.setattr(structure, "ask_count", lambda *a, **k: (4, 2))
    res = caption(model, image, schema=scene_schema(), decode=DecodeConfig(sampler=hot()))
    assert res.count == 4 and len(res.data) == 4 and res.nfe == 2 + 16
    monkeypatch.setattr(structure, "ask_count", lambda *a, **k: (9, 2))  # outside 1..6: max items
    res = caption(model, image, schema=scene_schema(), decode=DecodeConfig(sampler=hot()))
    assert res.count == 9 and 1 <= len(res.data) <= 6 and res.nfe == 2 + 24
    validate(res.data, scene_schema())


def test_count_question_is_decoded_as_digits(model, image):
    from mmdiff.tasks.captioning import ask_count

    for seed in range(4):
        count, nfe = ask_count(model, image, decode=DecodeConfig(sampler=hot(seed=seed)))
        assert 0 <= count <= 99 and 1 <= nfe <= 2


def test_text_caption_length_control(model, image):
    sp = SpecialIds.from_tokenizer(model.tokenizer)
    for n in (1, 5, 12):
        events = []
        prior = StructurePrior(Template.free(n), model.tokenizer)
        model.generate(["describe the image."], images=[image], decode=DecodeConfig(sampler=prior.sampler_config(hot(suppress_eos=True))), strategies=[prior], callback=events.append)
        assert events and all(not {sp.eos, sp.pad} & set(e.canvas[0, :n].tolist()) for e in events)
        res = caption(model, image, format="text", length=n, decode=DecodeConfig(sampler=hot()))
        assert res.data is None and res.nfe <= n and res.text
    res = caption(model, image, format="text", decode=DecodeConfig(sampler=SamplerConfig(gen_length=8)))
    assert res.nfe == 8


def test_caption_bad_arguments(model, image):
    with pytest.raises(ValueError, match="length applies to format='text'"):
        caption(model, image, length=4)
    with pytest.raises(ValueError, match="schema applies to format='json'"):
        caption(model, image, format="text", schema=scene_schema())
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        caption(model, image, format="xml")
    with pytest.raises(ValueError, match="unknown array_length 'some'"):
        caption(model, image, array_length="some")
    with pytest.raises(ValueError, match="length must be >= 1"):
        caption(model, image, format="text", length=0)


def test_template_longer_than_context_names_the_position(tok, image):
    small = tiny_model(tok, max_seq_len=48)  # prompt = 16 image tokens + ~8 text tokens
    with pytest.raises(ValueError, match=r"more than the model's context \(max_seq_len 48\); it overflows at "
                                         r"template position \d+"):
        caption(small, image, schema=scene_schema(), array_length="max")
    prior = StructurePrior(Template.parse("<mask:10> then <mask:30> end"), tok)
    with pytest.raises(ValueError, match=r"overflows at template position 15 \('<mask:30>'\)"):
        prior.check_context(32, prompt_len=10)
    prior.check_context(64, prompt_len=10)


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    return path


def test_cli_caption(model_dir, image, tmp_path, capsys):
    from mmdiff.cli import main

    img = tmp_path / "scene.png"
    image.save(img)
    assert main(["caption", "--image", str(img), "--model", str(model_dir), "--temperature", "1", "--seed", "3"]) == 0
    validate(json.loads(capsys.readouterr().out), scene_schema())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(MIXED_SCHEMA))
    assert main(["caption", "--image", str(img), "--model", str(model_dir), "--schema", str(schema),
                 "--array-length", "max"]) == 0
    validate(json.loads(capsys.readouterr().out), MIXED_SCHEMA)
    assert main(["caption", "--image", str(img), "--model", str(model_dir), "--format", "text", "--length", "3"]) == 0
    assert capsys.readouterr().out.strip()
    schema.write_text(json.dumps({"type": "number"}))
    assert main(["caption", "--image", str(img), "--model", str(model_dir), "--schema", str(schema)]) == 2
    assert "unsupported type 'number'" in capsys.readouterr().err
    assert main(["caption", "--image", str(img), "--model", str(model_dir), "--length", "3"]) == 2
    assert "--length applies to --format text" in capsys.readouterr().err


def test_benchmark_script_runs_on_a_tiny_model(model_dir, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_structure_priors", ROOT / "bench" / "structure_priors.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(model_dir), "--n", "2", "--temperature", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("| plain |", "| prior, count first | 100.0% | 100.0% |", "| prior, max items | 100.0% | 100.0% |",
                "| prior, true count | 100.0% | 100.0% |"):
        assert row in out


def test_sampler_config_sets_canvas_and_keeps_eos_suppression_only_for_exact_slots(tok, model, image):
    exact = StructurePrior(Template.free(6), tok)
    cfg = exact.sampler_config(SamplerConfig(gen_length=64, suppress_eos=True))
    assert (cfg.gen_length, cfg.steps, cfg.suppress_eos) == (7, 6, True)
    assert exact.sampler_config(SamplerConfig(steps=3)).steps == 3
    ranged = StructurePrior(Template.parse("<enum:true|false> <mask:1-3>"), tok)
    assert not ranged.sampler_config(SamplerConfig(suppress_eos=True)).suppress_eos
    res = caption(model, image, schema=MIXED_SCHEMA, decode=DecodeConfig(sampler=hot(suppress_eos=True)), array_length="max")
    validate(res.data, MIXED_SCHEMA)


def test_caption_threads_pruning_and_callback_to_every_sampler_run(model, image, monkeypatch):
    from mmdiff.sampling.pruning import PruningConfig

    pruning, calls, events = PruningConfig(prune="vtw", prune_layer=1, skip_layers=(0,)), [], []
    generate = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["decode"].pruning)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    res = caption(model, image, schema=scene_schema(), decode=DecodeConfig(sampler=hot(), pruning=pruning), callback=events.append)
    validate(res.data, scene_schema())
    assert calls == [pruning, pruning] and len(events) == res.nfe  # count question, then the caption
    res = caption(model, image, format="text", length=3, decode=DecodeConfig(sampler=hot(), pruning=pruning), callback=events.append)
    assert calls[-1] == pruning and len(calls) == 3
