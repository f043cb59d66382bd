"""Measured quality of the shipped model on the held-out test split, per question type. Prints one table.

Systems, side by side on the same questions:

* ``diffusion``: the shipped model (``--model``), the one sampler, one token per step, prefix cache;
* ``AR baseline``: the phase-1 checkpoint (``--ar-model``), KV-cached greedy left-to-right decoding;
* ``diffusion only``: optionally a model trained without phase 1 on the same compute (``--diffusion-only``);
* ``speech baseline``: optionally another model's speech path (``--speech-baseline``, e.g. the model with
  the from-scratch speech encoder that preceded the Whisper one), on the same clips.

Workloads (test split, generated in memory from ``--seed``; test scenes never appear in training):
typed questions of every short family (``--per-type`` each), spoken questions in the held-out voices
(``--spoken``, synthesised with espeak-ng) and their ASR word error rate (and the same questions typed:
their ceiling), the same families spoken by
a synthesiser never used in training (``--other-spoken``, CMU flite when installed: ``bench/other_tts.py``), and
captions (``--captions`` each of "describe the image." and "describe the image in json."): JSON
parse rate and the share of captions with every object right. For a model with a CTC language
model (``ctc_lm.json``), spoken questions and CTC transcripts are also scored without it
(``, no LM`` rows: the soft best-path runs), on the same clips.

    python bench/quality.py [--model checkpoints/mmdiff-tiny] [--ar-model checkpoints/mmdiff-tiny-ar]
        [--diffusion-only DIR] [--per-type 100] [--spoken 100] [--captions 50] [--long-block N] [--json OUT.json]
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common

ASR_LENGTH = 24  # canvas for "transcribe the audio." answers (the longest question is under 20 tokens)

SHORT_TYPES = ("attribute", "existence", "count", "position", "relation", "comparison", "verify")
ASR_QUESTION = "transcribe the audio."


def build_examples(args, folder: Path) -> dict[str, list[dict]]:
    """Test-split workloads: {name: [{question, answer, image, audio?, transcript?}]}; spoken clips are written
    under ``folder``."""
    from mmdiff.data.dataset import SPOKEN_TYPES
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import render, sample_scene
    from mmdiff.data.speech import NO_SYNTHESISER, espeak_available, speak
    from other_tts import FLITE_VOICES, NO_FLITE, flite_available, flite_clip

    rng = random.Random(f"quality-{args.seed}")
    work: dict[str, list[dict]] = defaultdict(list)
    wanted = {**{t: args.per_type for t in SHORT_TYPES}, "caption": args.captions, "caption_json": args.captions}
    while any(len(work[t]) < n for t, n in wanted.items()):
        scene = sample_scene(rng, "test")
        image = render(scene, rng)
        for qtype, n in wanted.items():
            if len(work[qtype]) < n:
                qa = ask(scene, rng, qtype)
                if qa is not None:
                    work[qtype].append({"question": qa.question, "answer": qa.answers[0], "image": image, "scene": scene})
    if args.spoken and espeak_available():
        tmp = folder / "espeak"
        tmp.mkdir()
        while len(work["spoken"]) < args.spoken:
            scene = sample_scene(rng, "test")
            qa = ask(scene, rng, rng.choice(SPOKEN_TYPES))
            if qa is None:
                continue
            path, _ = speak(qa.question, tmp / f"{len(work['spoken'])}.wav", split="test", rng=rng)
            work["spoken"].append({"question": "", "answer": qa.answers[0], "image": render(scene, rng),
                                   "audio": str(path), "transcript": qa.question})
        work["asr"] = [{"question": ASR_QUESTION, "answer": e["transcript"], "image": None, "audio": e["audio"]}
                       for e in work["spoken"]]
        work["spoken, typed (ceiling)"] = typed_twins(work["spoken"])
    elif args.spoken:
        print(f"{NO_SYNTHESISER}: spoken questions skipped", file=sys.stderr)
    if args.other_spoken and flite_available():
        tmp = folder / "flite"
        tmp.mkdir()
        other = "spoken, other synthesiser"
        while len(work[other]) < args.other_spoken:
            scene = sample_scene(rng, "test")
            qa = ask(scene, rng, rng.choice(SPOKEN_TYPES))
            if qa is None:
                continue
            voice = FLITE_VOICES[len(work[other]) % len(FLITE_VOICES)]
            path = flite_clip(qa.question, tmp / f"{len(work[other])}.wav", voice=voice, rng=rng)
            work[other].append({"question": "", "answer": qa.answers[0], "image": render(scene, rng),
                                "audio": str(path), "transcript": qa.question})
        work["spoken, other synthesiser, typed (ceiling)"] = typed_twins(work[other])
        work["asr, other synthesiser"] = [{"question": ASR_QUESTION, "answer": e["transcript"], "image": None,
                                           "audio": e["audio"]} for e in work[other]]
    elif args.other_spoken:
        print(NO_FLITE, file=sys.stderr)
    return dict(work)


def typed_twins(spoken: list[dict]) -> list[dict]:
    """The spoken questions typed (their transcripts, no audio): the ceiling of the spoken rows."""
    return [{"question": e["transcript"], "answer": e["answer"], "image": e["image"]} for e in spoken]


def answer(model, examples: list[dict], *, ar: bool, gen_length: int, batch: int,
           block_length: int | None = None) -> tuple[list[str], float]:
    """Predictions and seconds per example (``block_length``: semi-autoregressive blocks, diffusion only)."""
    from mmdiff.sampling import DecodeConfig, SamplerConfig

    preds, t0 = [], time.perf_counter()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        kw = dict(images=[e["image"] for e in chunk], audios=[e.get("audio") for e in chunk])
        qs = [e["question"] for e in chunk]
        if ar:
            res = model.generate_ar(qs, max_new_tokens=gen_length, **kw)
        else:
            decode = DecodeConfig(sampler=SamplerConfig(gen_length=gen_length, block_length=block_length),
                                  cache="prefix")
            res = model.generate(qs, decode=decode, **kw)
        preds += [r.text for r in res]
    return preds, (time.perf_counter() - t0) / max(1, len(examples))


def score(name: str, examples: list[dict], preds: list[str]) -> dict[str, float]:
    from mmdiff.evaluation.metrics import exact_match, score_json_caption, word_error_rate

    if name.startswith("asr"):
        return {"wer": word_error_rate([e["answer"] for e in examples], [p.lower().strip() for p in preds])}
    if name == "caption_json":
        scores = [score_json_caption(p, e["answer"]) for p, e in zip(preds, examples)]
        return {"parse": sum(s.parsed for s in scores) / len(preds), "all_right": sum(s.all_right for s in scores) / len(preds)}
    return {"accuracy": sum(exact_match(p, [e["answer"]]) for p, e in zip(preds, examples)) / len(preds)}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, seed=True)
    p.add_argument("--ar-model", default="checkpoints/mmdiff-tiny-ar", help="phase-1 AR checkpoint ('none' to skip)")
    p.add_argument("--diffusion-only", help="a model trained without phase 1 on the same compute")
    p.add_argument("--per-type", type=int, default=100, help="typed questions per family")
    p.add_argument("--spoken", type=int, default=100, help="spoken questions (held-out voices)")
    p.add_argument("--other-spoken", type=int, default=100,
                   help="spoken questions from a synthesiser never used in training (flite, when installed)")
    p.add_argument("--speech-baseline", help="another model scored beside --model on the speech workloads only "
                   "(e.g. the previous, from-scratch speech encoder)")
    p.add_argument("--captions", type=int, default=50, help="captions of each kind")
    p.add_argument("--long-block", type=int, help="decode captions in semi-autoregressive blocks of this many "
                   "tokens (LLaDA's long-answer setting; default: one block over the 152-token canvas)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    common.start(p, args)

    clips = tempfile.TemporaryDirectory(prefix="mmdiff-quality-")  # removed when main returns, or at exit
    work = build_examples(args, Path(clips.name))
    systems = [("diffusion", args.model, False)]
    if args.ar_model and args.ar_model != "none":
        systems.append(("AR baseline", args.ar_model, True))
    if args.diffusion_only:
        systems.append(("diffusion only", args.diffusion_only, False))
    if args.speech_baseline:
        systems.append(("speech baseline", args.speech_baseline, False))
    results: dict[str, dict[str, dict]] = {}
    for label, path, ar in systems:
        model = common.load_model(args, path)
        results[label] = {}
        for name, examples in work.items():
            long = name in ("caption", "caption_json")
            if not examples or model.audio is None and (any(e.get("audio") for e in examples)
                                                        or name.endswith("(ceiling)")):
                continue  # a workload asked for 0 times, or audio (or its typed twin) for a model without ears
            if label == "speech baseline" and not any(e.get("audio") for e in examples) and not name.endswith("(ceiling)"):
                continue  # the baseline is scored on speech only
            gen_length = 152 if long else ASR_LENGTH if name.startswith("asr") else 8
            preds, sec = answer(model, examples, ar=ar, gen_length=gen_length, batch=args.batch_size,
                                block_length=args.long_block if long else None)
            results[label][name] = {"n": len(examples), **score(name, examples, preds), "s_per_answer": sec,
                                    "samples": [{"q": e["question"] or e.get("transcript"), "pred": p_, "answer": e["answer"]}
                                                for e, p_ in list(zip(examples, preds))[:3]]}
            if name.startswith("asr") and hasattr(model.audio_adapter, "logits"):  # the adapter's own CTC transcript
                preds = model.transcribe([e["audio"] for e in examples])
                results[label][name.replace("asr", "asr_ctc", 1)] = {"n": len(examples), **score("asr", examples, preds),
                                             "samples": [{"pred": p_, "answer": e["answer"]}
                                                         for e, p_ in list(zip(examples, preds))[:3]]}
            if name.startswith(("spoken", "asr")) and getattr(model.audio_adapter, "uses_beam", False):
                # side by side: the same clips through the soft best-path runs, without the LM
                width, model.audio_adapter.cfg.beam_width = model.audio_adapter.cfg.beam_width, 0
                try:
                    if name.startswith("spoken"):
                        preds, sec = answer(model, examples, ar=ar, gen_length=gen_length, batch=args.batch_size)
                        results[label][f"{name}, no LM"] = {"n": len(examples), **score(name, examples, preds),
                                                            "s_per_answer": sec}
                    else:
                        preds = model.transcribe([e["audio"] for e in examples])
                        results[label][f"{name.replace('asr', 'asr_ctc', 1)}, no LM"] = {
                            "n": len(examples), **score("asr", examples, preds)}
                finally:
                    model.audio_adapter.cfg.beam_width = width
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def format_table(results: dict[str, dict[str, dict]]) -> str:
    labels = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    lines = ["| workload | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    typed = {lab: [results[lab][t]["accuracy"] for t in SHORT_TYPES if t in results[lab]] for lab in labels}

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        if "wer" in r:
            return f"WER {r['wer']:.3f}"
        if "parse" in r:
            return f"parse {r['parse']:.0%}, all objects right {r['all_right']:.0%}"
        return f"{r['accuracy']:.1%}"

    for name in names:
        n = next(results[lab][name]["n"] for lab in labels if name in results[lab])
        lines.append(f"| {name} | {n} | " + " | ".join(cell(results[lab].get(name)) for lab in labels) + " |")
    lines.append("| **typed, all short types** | | " + " | ".join(
        f"**{sum(v) / len(v):.1%}**" if v else "—" for v in typed.values()) + " |")
    lines.append("| seconds per answer (short) | | " + " | ".join(
        f"{results[lab]['count']['s_per_answer']:.3f}" if "count" in results[lab] else "—" for lab in labels) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
