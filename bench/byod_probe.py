"""How fast can the vision encoder itself learn the foreign benchmark's shapes? A direct shape probe (#21).

The default fine-tune learns colour (99%) but not shape (44%) on ``bench/byod_data.py``'s images. This
separates the vision encoder from the rest of the path: a linear classifier over the mean of the encoder's
patch features is trained directly on the five shape labels (circle, square, triangle, star, pentagon) of
one question per training image, with the encoder frozen (features computed once) or fine-tuned with it,
AdamW at ``--lr`` per row, batch 32, and scored on the test split's images every ``--every`` steps. If the
encoder fine-tuned with a direct label already needs thousands of images, the answer loss through the
decoder (one answer token per question, a quarter of the questions about shape) cannot do better.

    python bench/byod_probe.py [--data data/byod] [--model checkpoints/mmdiff-tiny] [--steps 600]
        [--train-images 3000] [--test-images 400] [--threads 2]
"""
from __future__ import annotations

import copy
import json
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
    for step in range(1, steps + 1):
        i = torch.randint(0, len(xtr), (32,), generator=g)
        feats = vision(xtr[i]).mean(1) if tune else ftr[i]
        loss = nn.functional.cross_entropy(head(feats), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                pred = head(vision(xte).mean(1) if tune else fte).argmax(-1)
            curve.append((step, (pred == yte).float().mean().item(), time.perf_counter() - t0))
    return curve


def main() -> None:
    p = common.parser(__doc__, threads=2)
    p.add_argument("--data", default="data/byod", help="bench/byod_data.py's output (default: data/byod)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=150)
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--test-images", type=int, default=400)
    args = p.parse_args()
    common.start(p, args)
    from PIL import Image

    data = Path(args.data)
    if not (data / "train.json").exists():
        p.error(f"--data {data}: no train.json; write it with python bench/byod_data.py --out {data}")
    model = common.load_model(args)
    t0 = time.perf_counter()
    split = {}
    for name, n in (("train", args.train_images), ("test", args.test_images)):
        rows = shape_labels(data, name, n)
        split[name] = (model.vision.preprocess([Image.open(path).convert("RGB") for path, _ in rows]),
                       torch.tensor([y for _, y in rows]))
    (xtr, ytr), (xte, yte) = split["train"], split["test"]
    print(f"model {args.model}; {len(xtr)} training and {len(xte)} test images, {len(SHAPES)} shapes "
          f"(chance {1 / len(SHAPES):.0%}, majority {yte.bincount().max().item() / len(yte):.1%})\n")
    curves = [(name, lr, probe(model.vision, xtr, ytr, xte, yte, tune=tune, lr=lr, steps=args.steps, every=args.every))
              for name, tune, lr in ROWS]
    steps = [s for s, _, _ in curves[0][2]]
    print("| encoder | lr | " + " | ".join(f"step {s}" for s in steps) + " | seconds |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for name, lr, curve in curves:
        print(f"| {name} | {lr:g} | " + " | ".join(f"{a:.1%}" for _, a, _ in curve) + f" | {curve[-1][2]:.0f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
