"""What each model hears from another synthesiser: exact CTC transcripts per flite voice, the first clips'
wrong transcripts side by side, and how much silence each engine leaves around the speech.

The speech path's failures on flite were at the clip's edges (issue #22): espeak-ng starts speaking within
40 ms and some adapters heard words ("how?") in flite's 0.2-0.3 s of leading silence. This script shows it.

    python bench/transcripts.py --models DIR [DIR ...] [--n 60] [--show 24] [--seed 7] [--threads 2]
        [--lead-silence S]

``--lead-silence S`` puts S more seconds of the clip's own noise floor (the level of its first 50 ms, which
is silence in flite's clips) before each clip, as a microphone that starts recording before the speaker
would.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from other_tts import FLITE_VOICES, NO_FLITE, flite_available, flite_clip


def edges(wave: np.ndarray, floor_db: float = 25.0) -> tuple[float, float]:
    """Seconds before the first and after the last 10 ms frame within ``floor_db`` of the loudest frame."""
    frames = wave[: len(wave) // 160 * 160].reshape(-1, 160)
    energy = 10 * np.log10((frames.astype(np.float64) ** 2).mean(1) + 1e-12)
    active = np.flatnonzero(energy > energy.max() - floor_db)
    return active[0] * 0.01, (len(energy) - 1 - active[-1]) * 0.01


def lengthen_lead(path: str, seconds: float, seed: int) -> str:
    """Rewrite the 16 kHz clip at ``path`` with ``seconds`` of white noise at its first 50 ms's RMS before it."""
    import soundfile as sf

    wave, sr = sf.read(path, dtype="float32")
    rms = float(np.sqrt(np.mean(wave[: sr // 20].astype(np.float64) ** 2)))
    noise = np.random.default_rng(seed).normal(0.0, rms, round(seconds * sr)).astype(np.float32)
    sf.write(path, np.concatenate([noise, wave]), sr, subtype="PCM_16")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="model directories with an audio_ctc speech path")
    p.add_argument("--n", type=int, default=60, help="flite clips, spread over its voices (default 60)")
    p.add_argument("--show", type=int, default=24, help="clips whose wrong transcripts are printed (default 24)")
    p.add_argument("--seed", type=int, default=7, help="question and clip seed (default 7)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lead-silence", type=float, default=0.0,
                   help="seconds of the clip's own noise floor put before each clip (default 0)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n {args.n}: give at least one clip")
    if not 0 <= args.lead_silence <= 10:
        p.error(f"--lead-silence {args.lead_silence}: give 0 to 10 seconds")
    if not flite_available():
        p.exit(2, f"{NO_FLITE}\n")
    torch.set_num_threads(args.threads)
    from mmdiff import load
    from mmdiff.data.dataset import SPOKEN_TYPES
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import sample_scene
    from mmdiff.data.speech import speak
    from mmdiff.media import load_audio

    models = {}
    for path in args.models:
        model = load(path)
        if not model.transcribes:
            p.error(f"--models {path}: no audio_ctc speech path to transcribe with")
        models[path] = model
    folder = tempfile.TemporaryDirectory(prefix="mmdiff-transcripts-")  # removed when main returns, or at exit
    rng, tmp = random.Random(args.seed), Path(folder.name)
    clips, truth = [], []
    while len(clips) < args.n:
        qa = ask(sample_scene(rng, "test"), rng, rng.choice(SPOKEN_TYPES))
        if qa is None:
            continue
        voice = FLITE_VOICES[len(clips) % len(FLITE_VOICES)]
        clip = str(flite_clip(qa.question, tmp / f"{len(clips)}.wav", voice=voice, rng=rng))
        clips.append(lengthen_lead(clip, args.lead_silence, len(clips)) if args.lead_silence else clip)
        truth.append((voice, qa.question))
    heard = {path: [t.strip() for t in m.transcribe(clips)] for path, m in models.items()}

    print("silence around the speech (s), mean over the clips:\n")
    print("| engine | voices | leading | trailing |\n|---|---|---|---|")
    lead_trail = np.array([edges(load_audio(c)) for c in clips])
    print(f"| flite | {', '.join(FLITE_VOICES)} | {lead_trail[:, 0].mean():.2f} | {lead_trail[:, 1].mean():.2f} |")
    espeak = np.array([edges(load_audio(speak(q, tmp / f"e{k}.wav", split="test", rng=random.Random(k))[0]))
                       for k, (_, q) in enumerate(truth)])
    print(f"| espeak-ng | held-out voices | {espeak[:, 0].mean():.2f} | {espeak[:, 1].mean():.2f} |")

    print("\nexact transcripts (CTC + LM beam where the model has one):\n")
    print("| model | " + " | ".join(FLITE_VOICES) + " | all |\n|---|" + "---|" * (len(FLITE_VOICES) + 1))
    for path, out in heard.items():
        right = [o == q for o, (_, q) in zip(out, truth)]
        per = [sum(r for r, (v, _) in zip(right, truth) if v == voice) for voice in FLITE_VOICES]
        counts = [sum(v == voice for v, _ in truth) for voice in FLITE_VOICES]
        print(f"| {path} | " + " | ".join(f"{a}/{n}" for a, n in zip(per, counts)) + f" | {sum(right)}/{len(right)} |")

    print(f"\nwrong transcripts among the first {args.show} clips:\n")
    for k, (voice, question) in enumerate(truth[: args.show]):
        wrong = [(path, out[k]) for path, out in heard.items() if out[k] != question]
        if wrong:
            print(f"{voice:6s} {question}")
            for path, text in wrong:
                print(f"       {Path(path).name}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
