"""How fast can the vision encoder itself learn the foreign benchmark's shapes? A direct shape probe (#21).

The default fine-tune learns colour (99%) but not shape (44%) on ``bench/byod_data.py``'s images. This
separates the vision encoder from the rest of the path: a linear classifier over the mean of the encoder's
patch features is trained directly on the five shape labels (circle, square, triangle, star, pentagon) of
one question per training image, with the encoder frozen (features computed once) or fine-tuned with it,
AdamW at ``--lr`` per row, batch 32, and scored on the test split's images every ``--every`` steps. If the
encoder fine-tuned with a direct label already needs thousands of images, the answer loss through the
decoder (one answer token per question, a quarter of the questions about shape) cannot do better.

    python bench/byod_probe.py [--data data/byod] [--model checkpoints/mmdiff-tiny] [--steps 600]
        [--train-images 3000] [--test-images 400] [--threads 2] [--pretrain 250,500,1000]

``--tower WEIGHTS`` reads the images through a pretrained convolutional tower instead of the model's encoder: the
``timm_cnn`` encoder ``tf_efficientnet_lite0`` at ``--tower-size`` px, its stride-16 stage (what ``make
vision-weights`` converts: Google's ImageNet EfficientNet-Lite0). ``--grid`` adds one line: the frozen tower read by
a linear classifier over its whole patch grid (3,000 steps, AdamW 3e-3), per shape.

``--pretrain`` adds a second table: would a vision encoder pretrained on varied object sizes and
orientations carry these shapes? The encoder is first trained (AdamW 1e-3, batch 32, a linear head over
its whole patch grid) to name the single shape of images drawn like the generator's (its 4 shapes,
colours and light backgrounds) but large (radius 10-30 px of 64), at any position and rotation, filled or
outlined; after each listed step count it is frozen and read by a linear classifier over its whole patch
grid (the decoder sees every visual token, not their mean), trained on the foreign training images
(3,000 steps) and scored per shape. Two of the five shapes (star, pentagon) are never drawn in pretraining.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

import common

SHAPES = ("circle", "square", "triangle", "star", "pentagon")  # bench/byod_data.py's shapes
ROWS = (("frozen encoder", False, 3e-3), ("fine-tuned encoder", True, 3e-4), ("fine-tuned encoder", True, 1e-3))


def shape_labels(data: Path, split: str, n: int) -> list[tuple[Path, int]]:
    """(image, shape index) of the first ``n`` images of ``split`` with a shape or describe answer."""
    out, seen = [], set()
    for row in json.loads((data / f"{split}.json").read_text()):
        for turn in row["conversations"]:
            kind = turn.get("type", row.get("type"))
            if turn["from"] == "gpt" and kind in ("shape", "describe") and row["image"] not in seen:
                seen.add(row["image"])
                out.append((data / row["image"], SHAPES.index(turn["value"].split()[-1])))
                break
    return out[:n]


def step(opt: torch.optim.Optimizer, logits, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
    """One AdamW step of cross-entropy on a random batch of 32 rows of ``x`` (``logits(batch)`` -> (32, classes))."""
    i = torch.randint(0, len(x), (32,), generator=g)
    loss = nn.functional.cross_entropy(logits(x[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()


def probe(vision: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *,
          tune: bool, lr: float, steps: int, every: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """Train the probe (and the encoder when ``tune``); (step, test accuracy, seconds) every ``every`` steps."""
    vision = copy.deepcopy(vision).train(tune)
    torch.manual_seed(seed)
    if not tune:
        with torch.no_grad():
            ftr, fte = vision(xtr).mean(1), vision(xte).mean(1)
    head = nn.Linear(vision(xtr[:1]).shape[-1], len(SHAPES))
    opt = torch.optim.AdamW(list(head.parameters()) + (list(vision.parameters()) if tune else []), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    for k in range(1, steps + 1):
        if tune:
            step(opt, lambda batch: head(vision(batch).mean(1)), xtr, ytr, g)
        else:
            step(opt, head, ftr, ytr, g)
        if k % every == 0:
            with torch.no_grad():
                pred = head(vision(xte).mean(1) if tune else fte).argmax(-1)
            curve.append((k, (pred == yte).float().mean().item(), time.perf_counter() - t0))
    return curve


def pretraining_image(rng: random.Random):
    """(image, shape index into data.scenes.SHAPES): one large generator shape at a random position, size and
    rotation, filled or outlined (line 2-4 px), drawn at 4x and box-filtered to 64 x 64 like ``render``."""
    from PIL import Image, ImageDraw

    from mmdiff.data.scenes import COLOUR_RGB, SHAPES as GEN_SHAPES

    big = 4 * 64
    image = Image.new("RGB", (big, big), tuple(rng.randint(180, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    k = rng.randrange(len(GEN_SHAPES))
    r = rng.uniform(10, 30) * 4
    cx, cy, rot = rng.uniform(r, big - r), rng.uniform(r, big - r), rng.uniform(0, 2 * math.pi)
    colour, outline, width = COLOUR_RGB[rng.choice(sorted(COLOUR_RGB))], rng.random() < 0.5, rng.randint(2, 4) * 4
    if GEN_SHAPES[k] == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, outline=colour, width=width) if outline else draw.ellipse(box, fill=colour)
    else:
        if GEN_SHAPES[k] == "square":
            pts = [(0.8 * r * x, 0.8 * r * y) for x, y in ((1, 1), (-1, 1), (-1, -1), (1, -1))]
        elif GEN_SHAPES[k] == "triangle":
            pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        else:  # cross: arms a third of the width, as data.scenes draws it
            t = r / 3
            pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
                   (-t, -t)]
        c, s = math.cos(rot), math.sin(rot)
        pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
        draw.line(pts + [pts[0]], fill=colour, width=width, joint="curve") if outline else draw.polygon(pts, fill=colour)
    return image.resize((64, 64), Image.Resampling.BOX), k


def grid_probe(vision: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
               steps: int = 3000) -> tuple[float, list[float]]:
    """A linear classifier over the frozen encoder's whole patch grid; (test accuracy, accuracy per shape)."""
    vision = vision.eval()
    with torch.no_grad():
        ftr, fte = vision(xtr).flatten(1), vision(xte).flatten(1)  # (N, patches * D)
    torch.manual_seed(0)
    head = nn.Linear(ftr.shape[1], len(SHAPES))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        step(opt, head, ftr, ytr, g)
    with torch.no_grad():
        pred = head(fte).argmax(-1)
    return (pred == yte).float().mean().item(), [(pred[yte == c] == c).float().mean().item() for c in range(len(SHAPES))]


def pretraining_rows(vision: nn.Module, xtr, ytr, xte, yte, checkpoints: list[int], n_images: int = 6000) -> None:
    """Print the ``--pretrain`` table (see the module docstring)."""
    from mmdiff.data.scenes import SHAPES as GEN_SHAPES

    rng = random.Random(0)
    drawn = [pretraining_image(rng) for _ in range(n_images)]
    xp, yp = vision.preprocess([im for im, _ in drawn]), torch.tensor([k for _, k in drawn])
    print(f"\npretraining on {n_images} large single-shape images ({', '.join(GEN_SHAPES)}); frozen encoder read "
          f"over its whole patch grid\n")
    print("| encoder | pretraining steps | all | " + " | ".join(SHAPES) + " | pretraining seconds |")
    print("|---|---|---|" + "---|" * len(SHAPES) + "---|")
    acc, per = grid_probe(vision, xtr, ytr, xte, yte)
    print(f"| shipped | 0 | {acc:.1%} | " + " | ".join(f"{a:.1%}" for a in per) + " | 0 |")
    tuned = copy.deepcopy(vision).train()
    head = nn.Linear(tuned(xp[:1]).flatten(1).shape[1], len(GEN_SHAPES))
    opt = torch.optim.AdamW(list(tuned.parameters()) + list(head.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    seconds = 0.0
    for k in range(1, max(checkpoints) + 1):
        t0 = time.perf_counter()
        step(opt, lambda batch: head(tuned(batch).flatten(1)), xp, yp, g)
        seconds += time.perf_counter() - t0
        if k in checkpoints:
            acc, per = grid_probe(copy.deepcopy(tuned), xtr, ytr, xte, yte)
            print(f"| pretrained | {k} | {acc:.1%} | " + " | ".join(f"{a:.1%}" for a in per) + f" | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, threads=2)
    p.add_argument("--data", default="data/byod", help="bench/byod_data.py's output (default: data/byod)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=150)
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--test-images", type=int, default=400)
    p.add_argument("--pretrain", default="", help="comma-separated pretraining step counts for the second table "
                   "(e.g. 250,500,1000; default: none)")
    p.add_argument("--no-rows", action="store_true", help="skip the first table (the probe rows)")
    p.add_argument("--tower", help="a tf_efficientnet_lite0 safetensors file (make vision-weights): probe that "
                   "pretrained tower instead of the model's encoder")
    p.add_argument("--tower-size", type=int, default=96, help="--tower's input side in pixels (default 96)")
    p.add_argument("--grid", action="store_true", help="add the frozen whole-grid linear probe line")
    args = p.parse_args(argv)
    if args.tower and not Path(args.tower).is_file():
        p.error(f"--tower {args.tower}: no such file; write it with make vision-weights")
    try:
        checkpoints = sorted({int(v) for v in args.pretrain.split(",") if v.strip()})
    except ValueError:
        p.error(f"--pretrain {args.pretrain!r}: give comma-separated step counts, e.g. 250,500,1000")
    if any(c <= 0 for c in checkpoints):
        p.error(f"--pretrain {args.pretrain!r}: step counts must be positive")
    common.start(p, args)
    from PIL import Image

    data = Path(args.data)
    if not (data / "train.json").exists():
        p.error(f"--data {data}: no train.json; write it with python bench/byod_data.py --out {data}")
    model = common.load_model(args)
    vision = model.vision
    if args.tower:
        from mmdiff.encoders.vision import VisionEncoderConfig, build_vision_encoder

        vision = build_vision_encoder(VisionEncoderConfig(kind="timm_cnn", name="tf_efficientnet_lite0",
                                                          img_size=args.tower_size, layer=3, weights=args.tower))
    t0 = time.perf_counter()
    split = {}
    for name, n in (("train", args.train_images), ("test", args.test_images)):
        rows = shape_labels(data, name, n)
        split[name] = (vision.preprocess([Image.open(path).convert("RGB") for path, _ in rows]),
                       torch.tensor([y for _, y in rows]))
    (xtr, ytr), (xte, yte) = split["train"], split["test"]
    source = f"tower {args.tower} ({args.tower_size} px, {vision.num_tokens} tokens of {vision.out_dim})" \
        if args.tower else f"model {args.model}"
    print(f"{source}; {len(xtr)} training and {len(xte)} test images, {len(SHAPES)} shapes "
          f"(chance {1 / len(SHAPES):.0%}, majority {yte.bincount().max().item() / len(yte):.1%})\n")
    if args.grid:
        acc, per = grid_probe(vision, xtr, ytr, xte, yte)
        print("| encoder | readout | all | " + " | ".join(SHAPES) + " |\n|---|---|---|" + "---|" * len(SHAPES))
        print(f"| {'pretrained tower' if args.tower else 'model encoder'}, frozen | linear, whole grid | {acc:.1%} | "
              + " | ".join(f"{a:.1%}" for a in per) + " |\n")
    if checkpoints:
        pretraining_rows(vision, xtr, ytr, xte, yte, checkpoints)
    if args.no_rows:
        print(f"\nwall time {time.perf_counter() - t0:.0f} s")
        return
    curves = [(name, lr, probe(vision, xtr, ytr, xte, yte, tune=tune, lr=lr, steps=args.steps, every=args.every))
              for name, tune, lr in ROWS]
    steps = [s for s, _, _ in curves[0][2]]
    print("| encoder | lr | " + " | ".join(f"step {s}" for s in steps) + " | seconds |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for name, lr, curve in curves:
        print(f"| {name} | {lr:g} | " + " | ".join(f"{a:.1%}" for _, a, _ in curve) + f" | {curve[-1][2]:.0f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
