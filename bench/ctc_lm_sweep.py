"""Choose the CTC beam's LM weight (alpha) and length bonus (beta) on validation clips.

The clips are validation-split questions of the spoken families in the *training* voices, so the
held-out test voices that ``bench/quality.py`` and ``bench/asr_voices.py`` score stay untouched by
the choice. Two other validation sets, neither of them the test voices:

* ``--voices unheard``: the training accents with espeak-ng variants heard neither in training nor in the
  test voices (:data:`UNHEARD_VARIANTS`): generalisation to new speakers.
* ``--voices accents``: 20 synthetic accents (:func:`mmdiff.data.speech.write_accent`, drawn apart from any
  training run's) with the training variants: generalisation to new accents.

The encoder runs once; each (alpha, beta) decodes the same frames with
:func:`mmdiff.adapters.ctc.ctc_prefix_beam_search` and the model's ``ctc_lm.json`` (alpha 0 = no LM).
One table: WER and exact transcripts per setting, the best marked.

    python bench/ctc_lm_sweep.py [--model checkpoints/mmdiff-tiny] [--clips 150] [--alphas 0 0.3 0.5 0.8 1.2]
        [--betas 0 0.5 1.5 2.5] [--beam 8] [--voices train|unheard|accents]
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

import common

#: espeak-ng variants in neither TRAIN_VARIANTS nor the held-out voices' variants (checked in main)
UNHEARD_VARIANTS = ("m8", "klatt", "klatt4", "Andy", "Annie", "edward", "linda", "steph", "john", "belinda")


def main(argv: list[str] | None = None) -> int:
    from mmdiff.adapters.ctc import ctc_prefix_beam_search
    from mmdiff.data.dataset import SPOKEN_TYPES
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import sample_scene
    from mmdiff.data.speech import (HELDOUT_VOICES, TRAIN_ACCENTS, TRAIN_VARIANTS, accent_folder, sample_voice, speak,
                                    synthesize, write_accent)
    from mmdiff.evaluation.metrics import word_error_rate

    p = common.parser(__doc__, seed=True)
    p.add_argument("--clips", type=int, default=150, help="validation clips (training voices)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.8, 1.2])
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.5, 2.5])
    p.add_argument("--beam", type=int, default=8, help="beam width")
    p.add_argument("--voices", choices=["train", "unheard", "accents"], default="train",
                   help="train: the training voices (default); unheard: the training accents with variants heard "
                        "neither in training nor in the test voices; accents: 20 synthetic accents with the "
                        "training variants")
    args = p.parse_args(argv)
    common.start(p, args, speech=True)
    model = common.load_model(args)
    adapter = model.audio_adapter
    if getattr(adapter, "lm", None) is None:
        p.error(f"{args.model}: no audio_ctc adapter with a ctc_lm.json to tune")
    held_out_variants = {v.partition("+")[2] for v in HELDOUT_VOICES}
    assert not set(UNHEARD_VARIANTS) & (set(TRAIN_VARIANTS) | held_out_variants), "unheard variants must be unheard"
    rng = random.Random(f"ctc-lm-sweep-{args.seed}")
    clips, refs = [], []
    with tempfile.TemporaryDirectory(prefix="mmdiff-lm-sweep-") as tmp, accent_folder() as acc:
        a_rng = random.Random(f"ctc-lm-sweep-accents-{args.seed}")
        accents = [str(write_accent(Path(acc) / f"a{j}", a_rng)) for j in range(20)] if args.voices == "accents" else []
        while len(clips) < args.clips:
            qa = ask(sample_scene(rng, "val"), rng, rng.choice(SPOKEN_TYPES))
            if qa is not None:
                out = Path(tmp) / f"{len(clips)}.wav"
                if args.voices == "train":
                    path, _ = speak(qa.question, out, split="val", rng=rng)
                elif args.voices == "accents":
                    variant = rng.choice(TRAIN_VARIANTS)
                    voice = rng.choice(accents) + (f"+{variant}" if variant else "")
                    path, _ = speak(qa.question, out, split="val", rng=rng, voice=voice)
                else:
                    v = sample_voice(rng, "val")  # speed, pitch and SNR as validation draws them
                    voice = f"{rng.choice(TRAIN_ACCENTS)}+{rng.choice(UNHEARD_VARIANTS)}"
                    path = synthesize(qa.question, out, voice=voice, speed=v.speed, pitch=v.pitch, snr_db=v.snr_db,
                                      rng=rng)
                clips.append(str(path))
                refs.append(qa.question)
        with torch.no_grad():
            feats, mask = model.audio.preprocess(clips)
            enc = model.audio(feats, mask)
            logp = adapter.logits(enc).float().log_softmax(-1)  # (B, T, V+1)
    lengths = enc.mask.sum(-1).tolist()
    rows = []
    for alpha in args.alphas:
        for beta in args.betas:
            hyps = [model.tokenizer.decode(ctc_prefix_beam_search(
                logp[i, :n], adapter.blank, adapter.lm if alpha else None, lm_weight=alpha, length_bonus=beta,
                beam_width=args.beam)) for i, n in enumerate(lengths)]
            exact = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs)
            rows.append((alpha, beta, word_error_rate(refs, hyps), exact))
    best = min(rows, key=lambda r: (r[2], -r[3]))
    voices = {"train": "training voices", "unheard": "unheard variants of the training accents",
              "accents": "20 synthetic accents"}[args.voices]
    print(f"CTC beam (width {args.beam}) on {len(refs)} validation clips ({voices}), model {args.model}; "
          f"model's setting: alpha {adapter.cfg.lm_weight}, beta {adapter.cfg.length_bonus}")
    print("| alpha (LM weight) | beta (length bonus) | WER | exact |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:g} | {r[1]:g} | {r[2]:.3f}{' (best)' if r is best else ''} | {r[3]:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
