"""Bring your own data (#21): zero-shot vs fine-tuned accuracy on a foreign VQA benchmark, by question kind.

Runs, on one dataset in LLaVA format (default: the one ``bench/byod_data.py`` writes; generated when
missing): ``mmdiff eval`` of ``--model`` on the test split (zero-shot), the default fine-tune
``mmdiff train --data TRAIN --init MODEL --out DIR`` with no other flag (its wall time measured),
``mmdiff eval`` of the result, and the original typed test split's accuracy (``bench/quality.py``'s
questions, ``--per-type`` each) before and after. Questions whose answer holds a word outside the
shipped vocabulary (the new colours and shapes) are also scored on their own. Prints one table.

    python bench/byod.py [--data data/byod] [--model checkpoints/mmdiff-tiny] [--out runs/byod]
        [--finetuned DIR (skip training: score this model)] [--per-type 100] [--json OUT]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]


def eval_split(model: str, data: Path, out: Path) -> dict:
    """``mmdiff eval`` (its default decoding and per-type canvases) -> metrics and predictions."""
    from mmdiff.evaluation.canvas import choose_canvases
    from mmdiff.evaluation.runner import PREDICTIONS_FILE, evaluate, read_jsonl
    from mmdiff.sampling import DecodeConfig

    decode = DecodeConfig()
    canvases = {t: c.length for t, c in choose_canvases(data, model, decode).items()}
    metrics = evaluate(data, out, model_dir=model, decode=decode, canvases=canvases, batch_size=32, progress=False)
    return {"metrics": metrics, "predictions": read_jsonl(out / PREDICTIONS_FILE)}


def new_word_accuracy(predictions: list[dict]) -> tuple[int, float]:
    """Rows whose answer holds a word outside the shipped vocabulary, and their exact match."""
    from mmdiff.data.scenes import COLOURS, SHAPES

    known = set(COLOURS) | set(SHAPES) | {"yes", "no"}
    rows = [p for p in predictions if any(w not in known for w in p["answers"][0].split())]
    return len(rows), (sum(p["exact_match"] for p in rows) / len(rows) if rows else float("nan"))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--data", default="data/byod", help="folder with train.json / test.json (generated when missing)")
    p.add_argument("--out", default="runs/byod", help="work folder (fine-tuned model, eval runs)")
    p.add_argument("--finetuned", help="score this fine-tuned model instead of training one")
    p.add_argument("--per-type", type=int, default=100, help="original typed test questions per family")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    common.start(p, args)
    from mmdiff.training.finetune import original_accuracy

    data, out = Path(args.data), Path(args.out)
    if not (data / "train.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "byod_data.py"), "--out", str(data)], check=True)
    test = data / "test.json"
    res: dict = {"model": args.model, "data": str(data)}
    t0 = time.perf_counter()
    zero = eval_split(args.model, test, out / "eval-zero-shot")
    res["zero_shot_eval_s"] = time.perf_counter() - t0
    tuned_dir = args.finetuned
    if tuned_dir is None:
        tuned_dir = str(out / "model")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmdiff", "train", "--data", str(data / "train.json"), "--init",
                        args.model, "--out", tuned_dir, "--fresh", "--no-progress"], check=True, cwd=ROOT)
        res["train_wall_s"] = time.perf_counter() - t0
    tuned = eval_split(tuned_dir, test, out / "eval-finetuned")
    res["original_before"] = original_accuracy(args.model, per_type=args.per_type)
    res["original_after"] = original_accuracy(tuned_dir, per_type=args.per_type)
    res["zero_shot"], res["finetuned"] = zero["metrics"], tuned["metrics"]
    res["new_words"] = {"zero_shot": new_word_accuracy(zero["predictions"]),
                        "finetuned": new_word_accuracy(tuned["predictions"])}
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


def format_table(res: dict) -> str:
    z, f = res["zero_shot"], res["finetuned"]
    lines = ["| question kind | n | zero-shot | fine-tuned |", "|---|---|---|---|"]
    for t, row in f["by_type"].items():
        lines.append(f"| {t} | {row['n']} | {z['by_type'][t]['accuracy']:.1%} | {row['accuracy']:.1%} |")
    n, za = res["new_words"]["zero_shot"]
    _, fa = res["new_words"]["finetuned"]
    lines.append(f"| answers with a new word | {n} | {za:.1%} | {fa:.1%} |")
    lines.append(f"| **all (mmdiff eval exact match)** | {f['n']} | **{z['accuracy']:.1%}** | **{f['accuracy']:.1%}** |")
    b, a = res["original_before"], res["original_after"]
    lines.append(f"| original typed test split (7 families) | {7 * 100} | {b['typed']:.1%} (before) | {a['typed']:.1%} (after) |")
    if "train_wall_s" in res:
        lines.append(f"\nfine-tune wall time: {res['train_wall_s'] / 60:.1f} min (`mmdiff train --data TRAIN --init "
                     f"{res['model']} --out DIR`, no other flag)")
    lines.append("original split per family, before -> after: " + ", ".join(
        f"{t} {b[t]:.0%} -> {a[t]:.0%}" for t in b if t != "typed"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
