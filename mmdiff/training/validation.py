"""Validation during training, scored as ``mmdiff eval`` scores answers (:mod:`mmdiff.evaluation.metrics`).

Per stage kind: per-cell accuracy of the grounding head (``cells``), greedy-CTC word error rate and
exact match of the transcripts (``asr``), exact-match accuracy per question type (``ar``,
``diffusion``). Validation never changes the trained weights.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from ..adapters.ctc import ctc_greedy
from ..data.dataset import ASR_QUESTION as ASR_PROMPT
from ..data.questions import QUESTION_TYPES, ask
from ..evaluation.metrics import exact_match, normalize_answer, word_error_rate
from ..model import MultimodalDiffusionLM
from ..sampling import DecodeConfig, SamplerConfig
from ..sampling.autoregressive import ar_generate
from .banks import SceneBank, SpeechBank
from .batches import LONG_TYPES, Batcher, Example, embed_batch
from .heads import CellHead


@torch.no_grad()
def quick_eval(model: MultimodalDiffusionLM, bank: SceneBank, batcher: Batcher, *, mode: str, seed: int,
               per_type: int = 40, speech: SpeechBank | None = None) -> dict[str, float]:
    """Exact-match accuracy (:func:`~mmdiff.evaluation.metrics.exact_match`) per question type on
    validation scenes (greedy decoding); with a speech bank also spoken-question accuracy
    (``spoken``) and ASR exact match (``asr``).

    Args:
        model: the model being trained (left in train mode).
        bank: validation scenes, encoded.
        batcher: tokenises the questions.
        mode: ``ar`` (KV-cached greedy left-to-right) or ``diffusion`` (the sampler, one token per step).
        seed: draws the questions.
        per_type: questions per short type (a quarter as many captions).
        speech: encoded validation clips (None: no spoken rows).
    """
    model.eval()
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = {}
    for qtype in QUESTION_TYPES:
        n = per_type // 4 if qtype in LONG_TYPES else per_type
        items = []
        for _ in range(n * 20):
            if len(items) == n:
                break
            i = rng.randrange(len(bank.scenes))
            qa = ask(bank.scenes[i], rng, qtype)
            if qa is not None:
                items.append(Example(qa.question, qa.answers[0], qtype, scene=i))
        if items:
            groups[qtype] = items
    if speech is not None and speech.features is not None:
        ks = list(range(min(per_type, len(speech))))
        groups["spoken"] = [Example("", speech.qas[k].answers[0], "spoken", scene=speech.scene[k], clip=k) for k in ks]
        groups["asr"] = [Example(ASR_PROMPT, speech.qas[k].question, "asr", clip=k) for k in ks]
    acc: dict[str, float] = {}
    for name, items in groups.items():
        b = batcher.make(items, eos_fill=True)
        embeds, valid, _ = embed_batch(model, bank, b, speech)
        L = b["response"].shape[1]
        if mode == "ar":
            out = ar_generate(model.decoder, embeds, valid, max_new_tokens=L, eos_id=model.special.eos,
                              pad_id=model.special.pad)
        else:
            cache = model.exact_cache  # exact, and L times cheaper
            decode = DecodeConfig(sampler=SamplerConfig(gen_length=L, steps=L, block_length=L), cache=cache)
            out = model.sample(embeds, valid, decode=decode)
        preds = [model.decode(t.tolist()) for t in out.tokens]
        acc[name] = sum(exact_match(p, [e.answer]) for p, e in zip(preds, items)) / len(items)
    model.train()
    return acc


@torch.no_grad()
def asr_eval(model: MultimodalDiffusionLM, head: nn.Module, speech: SpeechBank) -> dict[str, float]:
    """Greedy CTC transcripts of ``speech``'s clips by the speech encoder + ``head``: word error rate
    and exact match, both on :func:`~mmdiff.evaluation.metrics.normalize_answer`'d text."""
    model.audio.eval()
    head.eval()
    refs, hyps = [], []
    for i in range(0, len(speech), 64):
        idx = list(range(i, min(i + 64, len(speech))))
        out = speech.audio_features(model, idx)  # cached states where the encoder (or its lower part) is frozen
        logp = head.logits(out).float().log_softmax(-1)
        for k, ids in zip(idx, ctc_greedy(logp, out.mask.sum(-1), logp.shape[-1] - 1)):
            refs.append(normalize_answer(speech.qas[k].question))
            hyps.append(normalize_answer(model.tokenizer.decode(ids)))
    model.audio.train()
    head.train()
    return {"wer": word_error_rate(refs, hyps), "exact": sum(r == h for r, h in zip(refs, hyps)) / len(refs)}


@torch.no_grad()
def cell_accuracy(model: MultimodalDiffusionLM, head: CellHead, bank: SceneBank) -> dict[str, float]:
    """Per-cell accuracy of the grounding head on every ``bank`` image, per label (shape, colour, size)."""
    model.vision.eval()
    logits = head(model.vision(bank.pixels.float()))
    model.vision.train()
    return {k: (v.argmax(-1) == bank.labels[k]).float().mean().item() for k, v in logits.items()}
