"""Word error rate of the speech path per voice: held-out test voices against training voices.

For each voice, ``--per-voice`` test-split questions (scenes and question families drawn from
``--seed``) are spoken with espeak-ng (random speed, pitch and noise as in the data sets) and
transcribed by the ``audio_ctc`` adapter's CTC head as spoken VQA transcribes them: with the
model's token n-gram LM (``ctc_lm.json``) by prefix beam search, and also without it (best path,
the ``no LM`` rows). One table; columns: WER, share of clips transcribed exactly, one example.
Models are compared on the same clips (``--compare``, e.g. the previous model with the from-scratch
speech encoder). Voices named ``flite:VOICE`` are spoken by CMU flite, a synthesiser never used in
training (``bench/other_tts.py``; listed by default when flite is installed).

    python bench/asr_voices.py [--model checkpoints/mmdiff-tiny] [--compare OTHER_DIR] [--per-voice 30]
        [--voices en-us,en-gb+f2]   # training voices listed beside the held-out ones
        [--other flite:slt,flite:awb]  # voices of another synthesiser
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import common

FAMILIES = ("count", "attribute", "relation", "comparison", "position")


def clips(voices: list[str], per_voice: int, seed: int, folder: Path) -> list[tuple[str, str, Path]]:
    """(voice, question, wav path) for ``per_voice`` test-split questions per voice."""
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import sample_scene
    from mmdiff.data.speech import sample_voice, synthesize
    from other_tts import flite_clip

    rng = random.Random(f"asr-voices-{seed}")
    out = []
    for v in voices:
        for i in range(per_voice):
            qa = None
            while qa is None:
                qa = ask(sample_scene(rng, "test"), rng, rng.choice(FAMILIES))
            p = sample_voice(rng, "test")  # speed, pitch, SNR; the voice is fixed here
            name = folder / f"{v.replace('+', '_').replace(':', '_')}-{i}.wav"
            if v.startswith("flite:"):
                path = flite_clip(qa.question, name, voice=v.removeprefix("flite:"), rng=rng)
            else:
                path = synthesize(qa.question, name, voice=v, speed=p.speed, pitch=p.pitch, snr_db=p.snr_db, rng=rng)
            out.append((v, qa.question, path))
    return out


def main(argv: list[str] | None = None) -> int:
    from other_tts import FLITE_VOICES, NO_FLITE, flite_available
    from mmdiff.data.speech import HELDOUT_VOICES
    from mmdiff.evaluation.metrics import word_error_rate

    p = common.parser(__doc__, seed=True)
    p.add_argument("--compare", help="a second model directory, scored on the same clips")
    p.add_argument("--per-voice", type=int, default=30, help="clips per voice")
    p.add_argument("--voices", default="en-us,en-gb+f2", help="training voices to list beside the held-out ones ('' for none)")
    p.add_argument("--other", default=",".join(f"flite:{v}" for v in FLITE_VOICES) if flite_available() else "",
                   help="voices of a synthesiser never used in training, 'flite:VOICE' (default: flite's, when "
                        "installed; '' for none)")
    args = p.parse_args(argv)
    common.start(p, args, speech=True)
    if any(v.startswith("flite:") for v in args.other.split(",")) and not flite_available():
        p.error(NO_FLITE)
    voices = list(HELDOUT_VOICES) + [v for v in args.voices.split(",") + args.other.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="mmdiff-asr-voices-") as tmp:
        data = clips(voices, args.per_voice, args.seed, Path(tmp))
        models = [args.model] + ([args.compare] if args.compare else [])
        heard = {}
        for path in models:
            model = common.load_model(args, path)
            if model.audio is None or not hasattr(model.audio_adapter, "logits"):
                p.error(f"{path}: the model has no audio_ctc speech path")
            wav = [str(c[2]) for c in data]
            if model.audio_adapter.uses_beam:
                heard[path] = [t.lower().strip() for t in model.transcribe(wav)]
                model.audio_adapter.cfg.beam_width = 0
            heard[path + (", no LM" if path in heard else "")] = [t.lower().strip() for t in model.transcribe(wav)]
    labels = list(heard)
    print(f"CTC transcripts of {args.per_voice} test-split questions per voice (held-out voices first)")
    print("| voice | held out | model | WER | exact | example (said -> heard) |\n|---|---|---|---|---|---|")
    for v in voices:
        rows = [k for k, c in enumerate(data) if c[0] == v]
        said = [data[k][1] for k in rows]
        for label in labels:
            got = [heard[label][k] for k in rows]
            exact = sum(a.rstrip("?") == b.rstrip("?") for a, b in zip(said, got)) / len(rows)
            print(f"| {v} | {'yes' if v in HELDOUT_VOICES else 'other synthesiser' if v.startswith('flite:') else 'no'} | {label} | {word_error_rate(said, got):.3f} | "
                  f"{exact:.0%} | {said[0]} -> {got[0]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
