"""Training items and their batches: questions drawn per type weight, tokenised onto a response
canvas, and embedded from the banks' cached encoder states."""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..data.dataset import ASR_QUESTION as ASR_PROMPT
from ..data.questions import QUESTION_TYPES, ask
from ..model import MultimodalDiffusionLM
from .banks import SceneBank, SpeechBank, audio_batch
from .recipe import TrainConfig

LONG_TYPES = ("caption", "caption_json")


@dataclass
class Example:
    """One training item: a (typed or spoken) question about a scene, or an ASR item."""

    question: str  # typed text ("" when spoken)
    answer: str
    type: str
    scene: int = -1  # bank scene index (-1: no image)
    clip: int = -1  # speech bank clip index (-1: no audio)
    focus: tuple[tuple[int, ...], ...] = ()  # cells the question is about (grounding targets)


class Batcher:
    """Turns bank scenes into tokenised (prompt, response) batches, questions drawn per type weight."""

    def __init__(self, model: MultimodalDiffusionLM, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        weights = {t: cfg.type_weights.get(t, 1.0) for t in QUESTION_TYPES}
        self.short_types = [t for t in QUESTION_TYPES if t not in LONG_TYPES and weights[t] > 0]
        self.short_w = [weights[t] for t in self.short_types]
        self.long_types = [t for t in LONG_TYPES if weights.get(t, 0) > 0]
        self.long_w = [weights[t] for t in self.long_types]
        self.prompt_ids = lru_cache(maxsize=200_000)(self._prompt_ids)
        self.answer_ids = lru_cache(maxsize=200_000)(self._answer_ids)

    def _prompt_ids(self, question: str, n_images: int, n_audio: int) -> tuple[int, ...]:
        return tuple(self.model.format_prompt(question, n_images=n_images, n_audio=n_audio))

    def _answer_ids(self, answer: str) -> tuple[int, ...]:
        return tuple(self.model.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def typed(self, bank: SceneBank, rng: random.Random, n: int, long: bool) -> list[Example]:
        """``n`` typed questions about random bank scenes (long = captions)."""
        types, w = (self.long_types, self.long_w) if long else (self.short_types, self.short_w)
        out = []
        while len(out) < n:
            i = rng.randrange(len(bank.scenes))
            qa = ask(bank.scenes[i], rng, rng.choices(types, w)[0])
            if qa is not None:
                out.append(Example(qa.question, qa.answers[0], qa.type, scene=i, focus=qa.focus))
        return out

    def spoken(self, speech: SpeechBank, rng: random.Random, n: int) -> list[Example]:
        """``n`` spoken items: spoken VQA (image + clip) or ASR (clip + instruction)."""
        return spoken_examples(speech, rng, n, asr_fraction=self.cfg.asr_fraction)

    def make(self, items: list[Example], *, eos_fill: bool, rng: random.Random | None = None) -> dict:
        """Tokenise; response = answer + EOS, EOS-filled to the canvas length (LLaDA SFT) or
        followed by ignored PAD (AR). The canvas length varies (random with ``rng``) so the model
        learns to end an answer with EOS whatever canvas it is given."""
        sp = self.model.special
        prompts = [self.prompt_ids(e.question, int(e.scene >= 0), int(e.clip >= 0)) for e in items]
        answers = [self.answer_ids(e.answer) + (sp.eos,) for e in items]
        longest = max(len(a) for a in answers)
        if longest <= self.cfg.short_length:
            L = self.cfg.short_length if rng is None else rng.randint(longest, self.cfg.short_length)
        else:
            L = self.cfg.long_length if rng is None else rng.randint(min(longest, self.cfg.long_length), self.cfg.long_length)
        answers = [a[:L] for a in answers]
        response, loss_mask = response_canvas(answers, L, fill=sp.eos if eos_fill else sp.pad, eos_fill=eos_fill)
        return {"prompts": prompts, "items": items, "response": response, "loss_mask": loss_mask}


def spoken_examples(speech: SpeechBank, rng: random.Random, n: int, *, asr_fraction: float) -> list[Example]:
    """``n`` items of random ``speech`` clips: with probability ``asr_fraction`` an ASR item (clip +
    instruction -> the transcript), else the spoken question about its scene (image + clip -> the answer)."""
    out = []
    for _ in range(n):
        k = rng.randrange(len(speech))
        qa = speech.qas[k]
        if rng.random() < asr_fraction:
            out.append(Example(ASR_PROMPT, qa.question, "asr", clip=k))
        else:
            out.append(Example("", qa.answers[0], qa.type, scene=speech.scene[k], clip=k, focus=qa.focus))
    return out


def response_canvas(answers: list, L: int, *, fill: int, eos_fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) responses (each answer + EOS, at most ``L`` ids) filled with ``fill``, and the loss mask:
    the answer, plus the fill when it is EOS (LLaDA SFT: the model learns to end); PAD fill is ignored (AR)."""
    response = torch.tensor([list(a) + [fill] * (L - len(a)) for a in answers])  # (B, L)
    loss_mask = torch.tensor([[1] * len(a) + [int(eos_fill)] * (L - len(a)) for a in answers], dtype=torch.bool)
    return response, loss_mask


def embed_batch(model: MultimodalDiffusionLM, bank: SceneBank, batch: dict,
                speech: SpeechBank | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings, valid mask and position kinds from cached encoder states (the adapters
    run with gradients)."""
    items: list[Example] = batch["items"]
    images: list[list[torch.Tensor]] = [[] for _ in items]
    audios: list[list[torch.Tensor]] = [[] for _ in items]
    with_img = [b for b, e in enumerate(items) if e.scene >= 0]
    if with_img:
        feats = bank.features[torch.tensor([items[b].scene for b in with_img])].float().to(model.device)  # (B', N, C)
        for b, t in zip(with_img, model.adapt_image(feats)):  # (n, D) each
            images[b] = [t]
    with_aud = [b for b, e in enumerate(items) if e.clip >= 0]
    if with_aud:
        tokens, mask = model.adapt_audio(audio_batch([speech.features[items[b].clip] for b in with_aud]))
        for b, t, m in zip(with_aud, tokens, mask):
            audios[b] = [t[m]]
    return model.embed_prompt(batch["prompts"], images=images, audios=audios, return_kinds=True)
