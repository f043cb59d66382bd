"""Structure priors vs plain prompting for JSON scene captions, on held-out test scenes.

Every method answers "describe the image in json." about the same ``--n`` test-split scenes
(generated in memory by ``mmdiff.data.iter_examples("test", data_seed)``) and prints one table:

* ``plain``: the unconstrained canvas of ``--gen-length`` tokens,
* ``prior, count first``: the scene-schema template sized by the answer to "how many objects are
  there?" (the default of ``mmdiff caption``),
* ``prior, max items``: 6 optional items, incomplete ones dropped (the fallback),
* ``prior, true count``: the template sized by the true object count (an upper bound that
  isolates counting errors).

Columns: parse rate (``json.loads`` succeeds), schema-valid rate (``SCENE_SCHEMA``), field accuracy
(objects matched by position; each true object has 4 fields, position included, and every predicted
object without a true object at its position adds 4 wrong fields), all-objects-right rate (the
list equals ``caption_json``), mean NFE and mean latency per image (count question included).

    python bench/structure_priors.py --n 100 [--model checkpoints/mmdiff-tiny] [sampler flags]
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

import common
from mmdiff.commands.options import add_decode_arguments, decode_config_from_args
from mmdiff.tasks.presets import JSON_CAPTION

DEFAULTS = JSON_CAPTION


@dataclass
class Score:
    """Totals over the images of one method."""

    n: int = 0
    parsed: int = 0
    valid: int = 0
    fields_right: int = 0
    fields_total: int = 0
    all_right: int = 0
    nfe: int = 0
    latency_s: float = 0.0


def evaluate(answer: Callable[[Any, Any], tuple[str, int]], examples: list, schema: dict) -> Score:
    """Run ``answer(scene, image) -> (text, nfe)`` on every (scene, image) and score it (after one untimed
    warm-up call, so the first method does not pay for one-time setup)."""
    from mmdiff.data.questions import caption_json
    from mmdiff.evaluation.metrics import score_json_caption
    from mmdiff.sampling.schema import is_valid

    if examples:
        answer(*examples[0])
    s = Score()
    for scene, image in examples:
        t0 = time.perf_counter()
        text, nfe = answer(scene, image)
        s.latency_s += time.perf_counter() - t0
        s.n, s.nfe = s.n + 1, s.nfe + nfe
        score = score_json_caption(text, caption_json(scene))
        if score.parsed:
            s.parsed += 1
            s.valid += is_valid(score.value, schema)
        s.fields_right, s.fields_total = s.fields_right + score.fields_right, s.fields_total + score.fields_total
        s.all_right += score.all_right
    return s


def format_table(rows: dict[str, Score]) -> str:
    """One markdown table, a row per method."""
    head = "| method | parse | schema-valid | field acc | all objects right | NFE | latency ms |"
    lines = [head, "|" + "---|" * 7]
    for name, s in rows.items():
        n = max(s.n, 1)
        lines.append(f"| {name} | {s.parsed / n:.1%} | {s.valid / n:.1%} | "
                     f"{s.fields_right / max(s.fields_total, 1):.1%} | {s.all_right / n:.1%} | "
                     f"{s.nfe / n:.1f} | {1000 * s.latency_s / n:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--n", type=int, default=100, help="test images (default: 100)")
    p.add_argument("--data-seed", type=int, default=0, help="test-split stream seed (default: 0)")
    add_decode_arguments(p, DEFAULTS, search=False)
    args = p.parse_args(argv)
    common.start(p, args)

    from mmdiff.data import iter_examples
    from mmdiff.data.scenes import scene_schema
    from mmdiff.tasks.captioning import caption
    from mmdiff.tasks.prompts import CAPTION_JSON_QUESTION

    model = common.load_model(args)
    decode = decode_config_from_args(args, DEFAULTS)
    config = decode.sampler
    schema = scene_schema()
    stream = iter_examples("test", args.data_seed, types=())  # scenes and images only, no questions
    examples = [(scene, image) for scene, image, _ in itertools.islice(stream, args.n)]

    def plain(scene, image):
        res = model.generate([CAPTION_JSON_QUESTION], images=[image], decode=decode)[0]
        return res.text, res.nfe

    def prior(array_length):
        def answer(scene, image):  # the scene is only read for the true count
            n = len(scene.objects) if array_length == "true" else array_length
            res = caption(model, image, schema=schema, decode=decode, array_length=n)
            return res.text, res.nfe
        return answer

    rows = {"plain": evaluate(plain, examples, schema),
            "prior, count first": evaluate(prior("count"), examples, schema),
            "prior, max items": evaluate(prior("max"), examples, schema),
            "prior, true count": evaluate(prior("true"), examples, schema)}
    print(f"JSON scene captions, {len(examples)} test images (data seed {args.data_seed}), model {args.model}, "
          f"temperature {config.temperature}, steps {config.steps or 'one per token'}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
