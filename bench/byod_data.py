"""A foreign VQA dataset mmdiff's generator did not make, written in LLaVA format (issue #21).

Another renderer, another world: one large shape per image at a free position (no grid), slightly
rotated, outlined, on a noisy two-tone background; images of several sizes and aspect ratios
(64 x 64 to 112 x 64, portrait and landscape); 10 colours of which 4 are outside mmdiff's palette
(pink, grey, navy, lime) and 5 shapes of which 2 are words mmdiff never saw (star, pentagon); free
phrasings (several templates per kind, "colour" and "color"), negations and yes/no questions that
are balanced, so only the image can answer them. It is at least as hard as the held-back public set
of the issue (one large shape per 64 x 64 image, 8 colours with 3 new, one new shape word).

Question kinds (the row's ``type``): ``colour``, ``shape``, ``describe`` (colour + shape), ``yesno_colour``,
``yesno_shape``, ``yesno_both`` (each yes/no kind half negated: "is the shape not red?").

Layout written under ``--out``::

    train.json   LLaVA conversations; a quarter of the images carry a multi-turn conversation
    test.json    one question per conversation (what ``mmdiff eval`` scores row by row)
    images/<split>-<i>.png

    python bench/byod_data.py --out data/byod [--train-images 10000 --questions 4] [--test-images 1000]
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30), "green": (30, 150, 50), "blue": (40, 70, 225), "yellow": (240, 205, 20),
    "purple": (135, 40, 175), "orange": (250, 125, 10),
    "pink": (255, 120, 190), "grey": (125, 125, 125), "navy": (15, 20, 95), "lime": (165, 235, 45),
}
NEW_COLOURS = ("pink", "grey", "navy", "lime")
SHAPES = ("circle", "square", "triangle", "star", "pentagon")
NEW_SHAPES = ("star", "pentagon")
SIZES = ((64, 64), (96, 64), (64, 96), (112, 64), (80, 72))  # (width, height)
KINDS = ("colour", "shape", "describe", "yesno_colour", "yesno_shape", "yesno_both")

COLOUR_Q = ("what color is the shape?", "what colour is the object?", "which colour does the figure have?",
            "tell me the color of the thing in the picture.", "what is the color of the {shape}?",
            "the {shape} is which colour?")
SHAPE_Q = ("what shape is shown?", "what kind of shape is this?", "name the shape in the image.",
           "which figure is drawn here?", "what is the {colour} object?", "what shape does the {colour} thing have?")
DESCRIBE_Q = ("what is in the picture?", "describe the object with its colour and shape.",
              "what do you see? answer with color and shape.")
YES_COLOUR = ("is the shape {c}?", "is the object coloured {c}?", "is it a {c} one?", "does the figure look {c}?")
NO_COLOUR = ("is the shape not {c}?", "is the object not {c}?", "is the figure not coloured {c}?")
YES_SHAPE = ("is this a {s}?", "is there a {s} in the image?", "is the object a {s}?", "do you see a {s}?")
NO_SHAPE = ("is this not a {s}?", "is there no {s} in the image?", "is the object not a {s}?")
YES_BOTH = ("is it a {c} {s}?", "is there a {c} {s}?", "does the picture show a {c} {s}?")
NO_BOTH = ("is it not a {c} {s}?", "is there no {c} {s}?")


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` of radius ``r`` about (cx, cy), rotated by ``angle`` radians."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "pentagon":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 5, r) for k in range(5)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.42) for k in range(10)]
    else:
        raise ValueError(f"no polygon for {shape!r}")
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for a, rr in pts]


def render(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """One large outlined ``colour`` ``shape`` on a noisy two-tone background, 4x supersampled."""
    w, h = rng.choice(SIZES)
    s = 4
    bg1 = tuple(rng.randint(185, 245) for _ in range(3))
    bg2 = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in bg1)
    img = Image.new("RGB", (w * s, h * s), bg1)
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a second tone: top/bottom or left/right half
        d.rectangle([0, 0, w * s, h * s // 2] if rng.random() < 0.5 else [0, 0, w * s // 2, h * s], fill=bg2)
    r = rng.uniform(0.30, 0.40) * min(w, h)
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[colour])
    outline = tuple(max(0, c - 70) for c in rgb)
    width = rng.choice((0, 1, 2)) * s
    if shape == "circle":
        box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
        d.ellipse(box, fill=rgb, outline=outline, width=width)
    else:
        pts = [(x * s, y * s) for x, y in polygon(shape, cx, cy, r, rng.uniform(-0.25, 0.25))]
        d.polygon(pts, fill=rgb, outline=outline, width=width)
    img = img.resize((w, h), Image.BOX)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img


def question(kind: str, shape: str, colour: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of ``kind`` about a ``colour`` ``shape``; yes/no kinds are balanced."""
    spelled = rng.choice(("color", "colour"))
    if kind == "colour":
        return rng.choice(COLOUR_Q).format(shape=shape).replace("colour", spelled).replace("color", spelled), colour
    if kind == "shape":
        return rng.choice(SHAPE_Q).format(colour=colour).replace("colour", spelled), shape
    if kind == "describe":
        return rng.choice(DESCRIBE_Q).replace("colour", spelled), f"{colour} {shape}"
    truth = rng.random() < 0.5
    negated = rng.random() < 0.5
    c = colour if truth else rng.choice([k for k in COLOURS if k != colour])
    s = shape if truth else rng.choice([k for k in SHAPES if k != shape])
    if kind == "yesno_both" and not truth:  # a false pair differs in colour, shape or both
        c, s = rng.choice(((c, shape), (colour, s), (c, s)))
    if kind == "yesno_colour":
        q = rng.choice(NO_COLOUR if negated else YES_COLOUR).format(c=c)
    elif kind == "yesno_shape":
        q = rng.choice(NO_SHAPE if negated else YES_SHAPE).format(s=s)
    else:
        q = rng.choice(NO_BOTH if negated else YES_BOTH).format(c=c, s=s)
    return q, "yes" if truth != negated else "no"


def write_split(out: Path, split: str, n_images: int, per_image: int, seed: int, multi_turn: float) -> int:
    """Write ``split``'s images and its LLaVA JSON; returns the number of questions."""
    rng = random.Random(f"byod-{split}-{seed}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, n_q = [], 0
    for i in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = f"images/{split}-{i:06d}.png"
        render(shape, colour, rng).save(out / image)
        kinds = rng.sample(KINDS, per_image)
        qas = [(k, *question(k, shape, colour, rng)) for k in kinds]
        if rng.random() < multi_turn:  # one conversation of several turns
            conv = []
            for t, (k, q, a) in enumerate(qas):
                conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                         {"from": "gpt", "value": a, "type": k}]  # a turn's own kind (readers take it)
            rows.append({"id": f"{split}-{i:06d}", "image": image, "conversations": conv})
        else:
            for t, (k, q, a) in enumerate(qas):
                rows.append({"id": f"{split}-{i:06d}-{t}", "image": image, "type": k, "conversations": [
                    {"from": "human", "value": f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"},
                    {"from": "gpt", "value": a}]})
        n_q += len(qas)
    (out / f"{split}.json").write_text(json.dumps(rows, indent=0))
    return n_q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/byod")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--questions", type=int, default=4, help="questions per image (distinct kinds)")
    p.add_argument("--multi-turn", type=float, default=0.25, help="share of train images asked as one conversation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    n_train = write_split(out, "train", args.train_images, args.questions, args.seed, args.multi_turn)
    n_test = write_split(out, "test", args.test_images, args.questions, args.seed, 0.0)
    print(f"wrote {out}/train.json ({n_train} questions) and {out}/test.json ({n_test} questions)")


if __name__ == "__main__":
    main()
