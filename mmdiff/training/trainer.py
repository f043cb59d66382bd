"""Staged training: encoder grounding, phase 1 (AR), phase 2 (masked diffusion).

One :class:`Trainer` runs the stages of a :class:`~mmdiff.training.recipe.TrainConfig` in order,
with a progress bar (loss, tokens/s), periodic validation accuracy per question type, atomic
resumable checkpoints and a NaN guard. Data parallel over ``torch.distributed`` (gloo on CPU,
nccl on GPU) by all-reducing gradients; launch with ``torchrun --nproc_per_node N -m mmdiff train``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.ctc import TokenNGram, ctc_greedy
from ..data.dataset import ASR_QUESTION as ASR_PROMPT, SPOKEN_TYPES
from ..io import load_safetensors, read_json, write_json
from ..model import ModelConfig, MultimodalDiffusionLM
from ..sampling import DecodeConfig, SamplerConfig
from ..sampling.autoregressive import ar_generate
from .losses import ar_loss, diffusion_loss, forward_mask
from .recipe import StageConfig, TrainConfig

log = logging.getLogger("mmdiff")

LONG_TYPES = ("caption", "caption_json")


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def sync_params(params: list[torch.Tensor], world: int) -> None:
    """Broadcast rank 0's parameters so every replica starts identical."""
    if world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients over replicas (one flat all-reduce)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).clone()
        off += n


# ------------------------------------------------------------------------------------------------
# the scene bank: rendered, preprocessed, and (after grounding) encoded once
# ------------------------------------------------------------------------------------------------
@dataclass
class SceneBank:
    """Scenes with preprocessed pixels, per-cell labels and (later) frozen encoder features."""

    scenes: list
    pixels: torch.Tensor  # (N, 3, H, W) float16
    labels: dict[str, torch.Tensor]  # name -> (N, 9) long
    features: torch.Tensor | None = None  # (N, n_patches, C) float16

    @classmethod
    def build(cls, model: MultimodalDiffusionLM, *, split: str, n: int, seed: int, desc: str,
              progress: bool = True) -> "SceneBank":
        from tqdm import tqdm

        from ..data.scenes import cell_labels, render, sample_scene

        rng = random.Random(f"{split}-{seed}")
        scenes, pixels, labels = [], [], {"shape": [], "colour": [], "size": []}
        chunk = 256
        bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress)
        for start in range(0, n, chunk):
            batch = [sample_scene(rng, split) for _ in range(min(chunk, n - start))]
            bar.update(len(batch))
            images = [render(s, rng) for s in batch]
            pixels.append(model.vision.preprocess(images).half())
            for s in batch:
                lab = cell_labels(s)
                for k in labels:
                    labels[k].append(lab[k])
            scenes += batch
        return cls(scenes, torch.cat(pixels), {k: torch.tensor(v) for k, v in labels.items()})

    @torch.no_grad()
    def encode(self, model: MultimodalDiffusionLM, batch_size: int = 256) -> None:
        """Run the (frozen) vision encoder once over every image."""
        model.vision.eval()
        self.features = torch.cat([model.vision(self.pixels[i:i + batch_size].float()).half()
                                   for i in range(0, len(self.scenes), batch_size)])


class GroundHead(nn.Module):
    """Training-only probes on the decoder's states.

    On the image-token states (one token per grid cell):
    ``focus`` (3 logits per cell): is the cell in focus group 1, 2, 3 of the question
    (:attr:`mmdiff.data.questions.QA.focus`: named object, second object, relation region).
    ``rank`` (MAX_OBJECTS + 1 classes per cell): the cell's object index in reading order, or
    "empty" (the order the captions list objects in).

    On the last prompt state (the one the answer is read from), when ``readout`` is set: per focus
    group 1 and 2, the number of objects in the group and, when the group is one cell, that cell's
    index and its shape, colour and size (or "empty"): the intermediate values of every question
    (see :meth:`Trainer._readout_loss`).

    On the same state one block later, when ``relate`` is set: the order (<, =, >) of the two
    groups' rows, columns (one-cell groups) and counts, and the operator the question applies to
    them (see :meth:`Trainer._relate_loss`).
    """

    READOUT_GROUPS = 2
    RELATE = ("row", "col", "count", "op")

    def __init__(self, dim: int, n_groups: int = 3, readout: bool = False, relate: bool = False) -> None:
        from ..data.questions import OPERATORS
        from ..data.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES

        super().__init__()
        self.n_groups = n_groups
        self.focus = nn.Linear(dim, n_groups)
        self.rank = nn.Linear(dim, MAX_OBJECTS + 1)
        classes = {"shape": len(SHAPES) + 1, "colour": len(COLOURS) + 1, "size": len(SIZES) + 1,
                   "cell": GRID * GRID, "count": MAX_OBJECTS + 1}
        self.readout = nn.ModuleDict({f"{g}_{k}": nn.Linear(dim, n) for g in range(self.READOUT_GROUPS)
                                      for k, n in classes.items()}) if readout else None
        self.relate = nn.ModuleDict({k: nn.Linear(dim, len(OPERATORS) + 1 if k == "op" else 3)
                                     for k in self.RELATE}) if relate else None


def _probe_loss(probes: nn.ModuleDict, state: torch.Tensor, targets: dict[str, list[tuple[int, int]]]) -> torch.Tensor:
    """Sum over probes k of the cross-entropy of ``probes[k]`` on the rows of ``state`` (B, D) that
    ``targets[k]`` lists as (row, class); probes without targets are skipped (zero when none has any)."""
    losses = [F.cross_entropy(probes[k](state[[b for b, _ in t]]).float(), torch.tensor([y for _, y in t], device=state.device))
              for k, t in targets.items() if t]
    return torch.stack(losses).sum() if losses else state.new_zeros(())


class CellHead(nn.Module):
    """Per-cell classifiers on grid-pooled encoder tokens (encoder grounding stage only)."""

    def __init__(self, dim: int, grid: tuple[int, int], n_cells: int = 3, n_classes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.grid, self.n_cells = grid, n_cells
        self.heads = nn.ModuleDict({k: nn.Linear(dim, v) for k, v in (n_classes or {}).items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        B, N, C = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, C, *self.grid)  # (B, C, h, w)
        x = F.adaptive_avg_pool2d(x, self.n_cells).flatten(2).transpose(1, 2)  # (B, 9, C)
        return {k: h(x) for k, h in self.heads.items()}  # name -> (B, 9, classes)


class CellLogits(nn.Module):
    """The ``cell_words`` adapter's own per-cell classifiers, as a grounding-stage head."""

    def __init__(self, model: MultimodalDiffusionLM) -> None:
        super().__init__()
        self.adapter = model.vision_adapter  # a reference: its parameters belong to the model

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.adapter.cell_logits(tokens)


# ------------------------------------------------------------------------------------------------
# spoken questions: synthesised once (espeak-ng), log-mels kept, encoder states cached after ASR
# ------------------------------------------------------------------------------------------------


@dataclass
class SpeechBank:
    """Spoken questions about bank scenes (the question text is the transcript)."""

    scene: list[int]  # bank scene each question is about
    qas: list  # QA whose question was spoken
    mels: list[torch.Tensor]  # (n_mels, T_i) float16 log-mels
    features: list[torch.Tensor] | None = None  # (T'_i, D) float16 frozen encoder states

    def __len__(self) -> int:
        return len(self.qas)

    @classmethod
    def build(cls, model: MultimodalDiffusionLM, bank: SceneBank, *, n: int, split: str, seed: int, desc: str,
              workers: int = 2, progress: bool = True) -> "SpeechBank":
        """Draw ``n`` (scene, question) pairs, speak them with ``split``'s voices (espeak-ng, in a
        thread pool: the work is in the subprocess) and compute log-mels."""
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        from ..data.questions import ask
        from ..data.speech import speak
        from ..encoders.audio import log_mel
        from ..media import load_audio

        rng = random.Random(f"speech-{split}-{seed}")
        items = []
        while len(items) < n:
            i = rng.randrange(len(bank.scenes))
            qa = ask(bank.scenes[i], rng, rng.choice(SPOKEN_TYPES))
            if qa is not None:
                items.append((i, qa, rng.getrandbits(32)))
        n_mels = model.cfg.audio.num_mel_bins
        with tempfile.TemporaryDirectory(prefix="mmdiff-speech-") as tmp:
            def one(k: int) -> torch.Tensor:
                _, qa, s = items[k]
                path, _ = speak(qa.question, Path(tmp) / f"{k}.wav", split=split, rng=random.Random(s))
                mel = log_mel(load_audio(path), n_mels=n_mels).half()
                path.unlink()
                return mel

            with ThreadPoolExecutor(workers) as ex:
                mels = list(tqdm(ex.map(one, range(n)), total=n, desc=desc, unit="clip", leave=False,
                                 disable=not progress))
        return cls([i for i, _, _ in items], [qa for _, qa, _ in items], mels)

    @torch.no_grad()
    def encode(self, model: MultimodalDiffusionLM, batch_size: int = 64) -> None:
        """Run the (frozen) speech encoder once over every clip."""
        model.audio.eval()
        self.features = []
        for i in range(0, len(self), batch_size):
            feats, mask = model.audio.batch_mels(self.mels[i:i + batch_size])
            out = model.audio(feats, mask)
            self.features += [h[m].half() for h, m in zip(out.last, out.mask)]


def audio_batch(features: list[torch.Tensor]):
    """Pad cached encoder states into an :class:`AudioFeatures` batch for the adapter."""
    from ..encoders.audio import AudioFeatures

    T = max(f.shape[0] for f in features)
    last = torch.stack([F.pad(f.float(), (0, 0, 0, T - f.shape[0])) for f in features])  # (B, T, D)
    mask = torch.arange(T)[None, :] < torch.tensor([f.shape[0] for f in features])[:, None]  # (B, T)
    return AudioFeatures(last=last, layers=[last], mask=mask)


def spec_augment(mels: torch.Tensor, rng: random.Random, *, freq_masks: int = 2, freq_width: int = 10,
                 time_masks: int = 2, time_frac: float = 0.08) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) without time warping: per clip, ``freq_masks`` bands of up to
    ``freq_width`` mel bins and ``time_masks`` spans of up to ``time_frac`` of the frames are set
    to the clip's mean log-mel.

    Args:
        mels: (B, n_mels, T) log-mels (a new tensor is returned).
        rng: random source.
    """
    out = mels.clone()
    B, M, T = out.shape
    for b in range(B):
        fill = out[b].mean()
        for _ in range(freq_masks):
            w = rng.randint(0, freq_width)
            f0 = rng.randint(0, M - w)
            out[b, f0:f0 + w] = fill
        for _ in range(time_masks):
            w = rng.randint(0, max(1, int(time_frac * T)))
            t0 = rng.randint(0, max(0, T - w))
            out[b, :, t0:t0 + w] = fill
    return out


def vtlp(mels: torch.Tensor, rng: random.Random, *, max_warp: float = 0.1) -> torch.Tensor:
    """Vocal tract length perturbation (Jaitly & Hinton 2013) on log-mels: per clip, the frequency
    axis is stretched by a factor alpha ~ U(1 - max_warp, 1 + max_warp), out[f] = in[f / alpha]
    (linear interpolation between mel bins, the top bin repeated past the edge). A longer or
    shorter vocal tract scales the formants; the warp simulates speakers the synthesiser never had.

    Args:
        mels: (B, n_mels, T) log-mels (a new tensor is returned).
        rng: random source.
        max_warp: largest relative stretch.
    """
    B, M, T = mels.shape
    out = torch.empty_like(mels)
    bins = torch.arange(M, dtype=torch.float32)
    for b in range(B):
        src = (bins / rng.uniform(1 - max_warp, 1 + max_warp)).clamp(0, M - 1)  # (M,) source bin of each output bin
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=M - 1)
        w = (src - lo)[:, None]  # (M, 1)
        out[b] = mels[b, lo] * (1 - w) + mels[b, hi] * w
    return out


def fit_ctc_lm(model: MultimodalDiffusionLM, cfg: TrainConfig) -> TokenNGram:
    """The inference LM of the CTC beam (``ctc_lm.json``): token n-grams of order ``cfg.ctc_lm_order``
    over ``cfg.ctc_lm_texts`` training-split questions of the spoken families, tokenised as the CTC
    targets are. Depends only on the config and the tokenizer, never on weights."""
    from ..data.questions import world_texts

    texts = world_texts(cfg.ctc_lm_texts, seed=f"ctc-lm-{cfg.seed}", types=SPOKEN_TYPES, answers=False)
    tok = model.tokenizer
    return TokenNGram.fit((tok(t, add_special_tokens=False)["input_ids"] for t in texts), order=cfg.ctc_lm_order,
                          vocab_size=model.cfg.decoder.vocab_size)


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Total word-level edit distance / total reference words."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors += d[len(h)]
        words += len(r)
    return errors / max(1, words)


# ------------------------------------------------------------------------------------------------
# batches of questions
# ------------------------------------------------------------------------------------------------
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
        from ..data.questions import QUESTION_TYPES

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
        from ..data.questions import ask

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
        out = []
        for _ in range(n):
            k = rng.randrange(len(speech))
            qa = speech.qas[k]
            if rng.random() < self.cfg.asr_fraction:
                out.append(Example(ASR_PROMPT, qa.question, "asr", clip=k))
            else:
                out.append(Example("", qa.answers[0], qa.type, scene=speech.scene[k], clip=k, focus=qa.focus))
        return out

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
        fill = sp.eos if eos_fill else sp.pad
        response = torch.tensor([list(a) + [fill] * (L - len(a)) for a in answers])  # (B, L)
        loss_mask = torch.tensor([[1] * len(a) + [int(eos_fill)] * (L - len(a)) for a in answers], dtype=torch.bool)
        return {"prompts": prompts, "items": items, "response": response, "loss_mask": loss_mask}


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


# ------------------------------------------------------------------------------------------------
# evaluation during training
# ------------------------------------------------------------------------------------------------
def normalize(ans: str) -> str:
    return " ".join(ans.lower().strip().rstrip(".").split())


@torch.no_grad()
def quick_eval(model: MultimodalDiffusionLM, bank: SceneBank, batcher: Batcher, *, mode: str, seed: int,
               per_type: int = 40, speech: SpeechBank | None = None) -> dict[str, float]:
    """Exact-match accuracy per question type on validation scenes (greedy decoding); with a
    speech bank also spoken-question accuracy (``spoken``) and ASR exact match (``asr``)."""
    from ..data.questions import QUESTION_TYPES, ask

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
            cache = "prefix" if model.cfg.decoder.attn_mode == "prefix" else "none"  # exact, and L times cheaper
            decode = DecodeConfig(sampler=SamplerConfig(gen_length=L, steps=L, block_length=L), cache=cache)
            out = model.sample(embeds, valid, decode=decode)
        preds = [model.decode(t.tolist()) for t in out.tokens]
        acc[name] = sum(normalize(p) == normalize(e.answer) for p, e in zip(preds, items)) / len(items)
    model.train()
    return acc


# ------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON; written to a temporary directory, then renamed)
# ------------------------------------------------------------------------------------------------
def save_state(path: Path, model: MultimodalDiffusionLM, opt: torch.optim.Optimizer | None, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if opt is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors, steps = {}, {}
        for group in opt.param_groups:
            for p in group["params"]:
                s = opt.state.get(p)
                if s and id(p) in names:  # training-only heads are not checkpointed
                    n = names[id(p)]
                    tensors[f"{n}::exp_avg"] = s["exp_avg"].contiguous()
                    tensors[f"{n}::exp_avg_sq"] = s["exp_avg_sq"].contiguous()
                    steps[n] = float(s["step"])
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "adam_steps": steps}
    write_json(tmp / "train_state.json", state)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer(path: Path, model: MultimodalDiffusionLM, opt: torch.optim.Optimizer, steps: dict) -> None:
    f = path / "optimizer.safetensors"
    if not f.exists():
        return
    tensors = load_safetensors(f)
    for n, p in model.named_parameters():
        if n in steps:
            opt.state[p] = {"step": torch.tensor(steps[n]), "exp_avg": tensors[f"{n}::exp_avg"],
                            "exp_avg_sq": tensors[f"{n}::exp_avg_sq"]}


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Runs a :class:`TrainConfig`.

    Args:
        cfg: the recipe.
        resume: continue from ``<out>/train_state`` when it exists.
        progress: show tqdm progress bars (rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = True, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.rank, self.world = dist_info()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.state_dir = self.out.with_name(self.out.name + ".train_state")
        self.log_path = self.out.with_name(self.out.name + ".train_log.jsonl")
        self.state = {"stage": 0, "step": 0}
        if not resume and self.rank == 0 and self.log_path.exists():
            self.log_path.unlink()  # a fresh run starts a fresh log
        torch.manual_seed(cfg.seed)
        if resume and (self.state_dir / "train_state.json").exists():
            self.model = MultimodalDiffusionLM.from_pretrained(self.state_dir)
            self.state = read_json(self.state_dir / "train_state.json")
            log.info("resuming from %s at stage %d step %d", self.state_dir, self.state["stage"], self.state["step"])
        else:
            tok = self._tokenizer()
            mcfg = ModelConfig.from_dict({"model_type": "mmdiff", **cfg.model})
            mcfg.decoder.vocab_size = len(tok)
            self.model = MultimodalDiffusionLM(mcfg, tok)
        self.model.train()
        self.bank: SceneBank | None = None
        self.val: SceneBank | None = None
        self.speech: SpeechBank | None = None
        self.val_speech: SpeechBank | None = None
        self.batcher = Batcher(self.model, cfg)
        if cfg.ctc_lm_order > 0 and getattr(self.model.audio_adapter, "lm", False) is None:
            self.model.audio_adapter.lm = fit_ctc_lm(self.model, cfg)
        self.parts: dict[str, float] = {}  # loss components of the last step, for the log

    # -- pieces -----------------------------------------------------------------------------------
    def _tokenizer(self):
        from ..data.questions import world_texts
        from ..tokenizer import train_tokenizer

        return train_tokenizer(world_texts(self.cfg.tokenizer_texts, seed=self.cfg.seed), vocab_size=self.cfg.vocab_size,
                               split_words=self.cfg.split_words)

    def _banks(self, stage: StageConfig) -> None:
        """Render (and, once the encoders are trained, encode) the scene and speech banks."""
        cfg = self.cfg
        if self.bank is None:
            self.bank = SceneBank.build(self.model, split="train", n=cfg.bank_images, seed=cfg.seed + 1000 * self.rank,
                                        desc="rendering train scenes", progress=self.progress)
            self.val = SceneBank.build(self.model, split="val", n=cfg.val_images, seed=cfg.seed, desc="rendering val scenes",
                                       progress=self.progress)
        uses_speech = cfg.speech_clips > 0 and stage.kind in ("asr", "ar", "diffusion")
        if uses_speech and self.speech is None:
            if self.model.audio is None:
                raise ValueError("speech_clips > 0 but the model config has no audio encoder")
            self.speech = SpeechBank.build(self.model, self.bank, n=cfg.speech_clips, split="train",
                                           seed=cfg.seed + 1000 * self.rank, desc="speaking train questions",
                                           progress=self.progress)
            self.val_speech = SpeechBank.build(self.model, self.val, n=cfg.speech_val_clips, split="val",
                                               seed=cfg.seed, desc="speaking val questions", progress=self.progress)
        if stage.kind in ("ar", "diffusion"):
            if self.bank.features is None:
                self.bank.encode(self.model)
                self.val.encode(self.model)
            if self.speech is not None and self.speech.features is None:
                self.speech.encode(self.model)
                self.val_speech.encode(self.model)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _lr(self, stage: StageConfig, step: int) -> float:
        if step < stage.warmup:
            return stage.lr * (step + 1) / stage.warmup
        prog = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> MultimodalDiffusionLM:
        """Run every remaining stage, then write the final model to ``cfg.out``."""
        for si, stage in enumerate(self.cfg.stages):
            if si < self.state["stage"]:
                continue
            self._run_stage(si, stage)
            self.state = {"stage": si + 1, "step": 0}
            if self.rank == 0:
                save_state(self.state_dir, self.model, None, self.state)
                if stage.save_as:
                    self.model.save_pretrained(stage.save_as)
        if self.rank == 0:
            self.model.eval()
            self.model.save_pretrained(self.out)
            log.info("wrote %s", self.out)
        if self.world > 1:  # every replica leaves together: no rank exits while gloo still talks to it
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return self.model

    def _run_stage(self, si: int, stage: StageConfig) -> None:
        from tqdm import tqdm

        model, cfg = self.model, self.cfg
        self._banks(stage)
        head = None
        model.freeze(["vision", "vision_adapter", "audio", "audio_adapter", "decoder"])
        model.freeze(stage.train, frozen=False)
        if stage.kind == "cells":
            from ..data.scenes import COLOURS, SHAPES, SIZES

            if hasattr(model.vision_adapter, "cell_logits"):  # cell_words: its own classifiers (kept)
                head = CellLogits(model)  # trains through head.requires_grad_ below
            else:
                head = CellHead(model.vision.out_dim, model.vision.grid,
                                n_classes={"shape": len(SHAPES) + 1, "colour": len(COLOURS) + 1, "size": len(SIZES) + 1})
        elif stage.kind == "asr":  # CTC head over the tokenizer's vocabulary plus a blank
            # the audio_ctc adapter's own head (kept: inference compresses with it), else a training-only one
            ctc = getattr(model.audio_adapter, "ctc", None)
            head = ctc if ctc is not None else nn.Linear(model.audio.out_dim, len(model.tokenizer) + 1)
        elif self.cfg.ground_weight > 0 or self.cfg.rank_weight > 0 or self.cfg.readout_weight > 0 \
                or self.cfg.relate_weight > 0:
            head = GroundHead(model.cfg.decoder.d_model, n_groups=self.cfg.ground_groups,
                              readout=self.cfg.readout_weight > 0,
                              relate=self.cfg.relate_weight > 0)  # probes on the decoder's states
        params = [p for p in model.parameters() if p.requires_grad]
        owned = {id(p) for p in params}  # the audio_ctc head is part of the model: not listed twice
        params += [p for p in ([] if head is None else head.parameters()) if id(p) not in owned]
        if head is not None:
            head.requires_grad_(True)
        sync_params(params, self.world)
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay)
        start = self.state["step"] if self.state["stage"] == si else 0
        if start and stage.kind in ("ar", "diffusion"):
            load_optimizer(self.state_dir, model, opt, self.state.get("adam_steps", {}))
        bar = tqdm(range(start, stage.steps), desc=f"[{stage.name}]", disable=not self.progress or self.rank > 0,
                   initial=start, total=stage.steps, dynamic_ncols=True)
        t_last, tokens_since = time.perf_counter(), 0
        for step in bar:
            rng = random.Random(f"{cfg.seed}-{self.rank}-{si}-{step}")
            for g in opt.param_groups:
                g["lr"] = self._lr(stage, step)
            loss, n_tokens = self._loss(stage, head, rng)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss ({loss.item()}) at stage {stage.name!r} step {step}, lr "
                                   f"{opt.param_groups[0]['lr']:.2e}; last checkpoint: {self.state_dir}. Lower the "
                                   "learning rate or resume from the checkpoint.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_grads(params, self.world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tokens_since += n_tokens
            if step % 10 == 0:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_since / (now - t_last):.0f}")
                self._log({"stage": stage.name, "step": step, "loss": loss.item(), **self.parts,
                           "lr": opt.param_groups[0]["lr"], "tok_s": tokens_since / (now - t_last), "time": time.time()})
                t_last, tokens_since = now, 0
            last = step == stage.steps - 1
            if self.rank == 0 and cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last):
                self._validate(stage, head, step + 1)
            if stage.kind in ("ar", "diffusion") and self.rank == 0 and (step + 1) % cfg.save_every == 0 and not last:
                save_state(self.state_dir, model, opt, {"stage": si, "step": step + 1})
        if stage.kind == "cells":
            self.bank.features = None  # encoder changed: features are recomputed when needed
        if stage.kind == "asr":
            self.speech.features = None

    def _validate(self, stage: StageConfig, head: nn.Module | None, step: int) -> None:
        from tqdm import tqdm

        if stage.kind == "cells":
            acc, key = self._cell_accuracy(head), "val_cell_acc"
        elif stage.kind == "asr":
            acc, key = self._asr_eval(head), "val_asr"
        else:
            acc, key = quick_eval(self.model, self.val, self.batcher, mode=stage.kind, seed=step,
                                  speech=self.val_speech), "val_acc"
        tqdm.write(f"[{stage.name}] step {step} {key} " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
        self._log({"stage": stage.name, "step": step, key: acc})

    def _loss(self, stage: StageConfig, head: CellHead | None, rng: random.Random) -> tuple[torch.Tensor, int]:
        model, bank = self.model, self.bank
        if stage.kind == "cells":
            idx = torch.tensor([rng.randrange(len(bank.scenes)) for _ in range(stage.batch_size)])
            logits = head(model.vision(bank.pixels[idx].float()))
            loss = sum(F.cross_entropy(v.reshape(-1, v.shape[-1]), bank.labels[k][idx].reshape(-1)) for k, v in logits.items())
            return loss, stage.batch_size * model.vision.num_tokens
        if stage.kind == "asr":
            return self._ctc_loss(head, [rng.randrange(len(self.speech)) for _ in range(stage.batch_size)])
        if self.speech is not None and rng.random() < stage.audio_fraction:
            items = self.batcher.spoken(self.speech, rng, stage.batch_size // 2)
        else:
            long = rng.random() < stage.long_fraction and bool(self.batcher.long_types)
            items = self.batcher.typed(bank, rng, stage.batch_size // 4 if long else stage.batch_size, long)
        batch = self.batcher.make(items, eos_fill=stage.kind == "diffusion", rng=rng)
        embeds, valid, kinds = embed_batch(model, bank, batch, self.speech)
        response = batch["response"].to(model.device)
        P = embeds.shape[1]
        if stage.kind == "ar":
            targets, noisy = response, response  # teacher forcing under the causal mask
            mode = "causal"
        else:
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            targets, masked, t = forward_mask(response, generator=g, complementary=stage.complementary)
            if stage.complementary:
                embeds, valid, kinds = torch.cat([embeds, embeds]), torch.cat([valid, valid]), torch.cat([kinds, kinds])
                items = items + items
            noisy = targets.masked_fill(masked, model.special.mask)
            mode = stage.attn_mode
        out = model.decoder(inputs_embeds=torch.cat([embeds, model.decoder.embed(noisy)], 1),
                            valid=torch.cat([valid, torch.ones_like(noisy, dtype=torch.bool)], 1),
                            attn_mode=mode, prefix_len=P, output_hidden_states=head is not None)
        n_tokens = int(valid.sum()) + noisy.numel()
        if stage.kind == "ar":
            loss = ar_loss(out.logits, targets.masked_fill(~batch["loss_mask"].to(targets.device), -100), P)
        else:
            logits = model.decoder.aligned_logits(out.logits)[:, P:]  # (B, L, V)
            loss = diffusion_loss(logits, targets, masked, t)
        self.parts = {"answer": loss.item()}
        if head is not None:
            ground, rank = self._ground_loss(head, out.hidden_states, kinds, items)
            self.parts["ground"], self.parts["rank"] = ground.item(), rank.item()
            loss = loss + self.cfg.ground_weight * ground + self.cfg.rank_weight * rank
            # where the first answer token is decoded: the last prompt position under AR (next-token),
            # also the first response position under diffusion when readout_at_response is set
            read_at = [P - 1, P] if stage.kind == "diffusion" and self.cfg.readout_at_response else [P - 1]
            if head.readout is not None:
                readout = sum(self._readout_loss(head, out.hidden_states, pos, items) for pos in read_at) / len(read_at)
                self.parts["readout"] = readout.item()
                loss = loss + self.cfg.readout_weight * readout
            if head.relate is not None:
                relate = sum(self._relate_loss(head, out.hidden_states, pos, items) for pos in read_at) / len(read_at)
                self.parts["relate"] = relate.item()
                loss = loss + self.cfg.relate_weight * relate
        return loss, n_tokens

    def _ground_loss(self, head: GroundHead, hidden: list[torch.Tensor], kinds: torch.Tensor,
                     items: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Grounding: the decoder's state at each image token (one per cell) predicts whether the
        question names that cell (focus group 1), its second object/group (group 2) or the region
        its relation selects (group 3); and, whatever the question, the cell's rank among the
        scene's objects in reading order (or "empty").

        Image tokens follow the question in the prompt, so they can attend to it under every mask.
        The dense per-cell targets teach the two-hop lookups (find the reference, then the cells
        in relation to it; find the k-th object) that one answer token per question teaches slowly.

        Returns:
            (focus BCE, rank cross-entropy), each a scalar (zero when no row has an image).
        """
        from ..model import IMAGE

        rows = [b for b, e in enumerate(items) if e.scene >= 0]
        zero = hidden[0].new_zeros(())
        if not rows:
            return zero, zero
        layer = self.cfg.ground_layer if self.cfg.ground_layer >= 0 else len(hidden) // 2
        img = kinds[rows] == IMAGE  # (B', P)
        h = hidden[layer][rows, : img.shape[1]]  # (B', P, D): prompt positions
        n_cells = int(img[0].sum())
        states = h[img].view(len(rows), n_cells, -1)  # (B', cells, D) in reading order
        rank_target = torch.full((len(rows), n_cells), head.rank.out_features - 1, dtype=torch.long)
        focus_target = torch.zeros(len(rows), n_cells, head.n_groups)
        has_focus = torch.zeros(len(rows), dtype=torch.bool)
        for r, b in enumerate(rows):
            for k, obj in enumerate(self.bank.scenes[items[b].scene].objects):
                rank_target[r, obj.cell] = k
            for g, cells in enumerate(items[b].focus[:head.n_groups]):
                focus_target[r, list(cells), g] = 1.0
            has_focus[r] = bool(items[b].focus)
        rank = F.cross_entropy(head.rank(states).float().reshape(-1, head.rank.out_features),
                               rank_target.reshape(-1).to(states.device))
        if not has_focus.any():
            return zero, rank
        sel = has_focus.to(states.device)
        focus = F.binary_cross_entropy_with_logits(head.focus(states[sel]).float(), focus_target[has_focus].to(states.device))
        return focus, rank

    def _readout_loss(self, head: GroundHead, hidden: list[torch.Tensor], pos: int,
                      items: list[Example]) -> torch.Tensor:
        """Answer-cell readout: the state at ``pos`` (the last prompt position P - 1, which left
        padding keeps fixed; with ``readout_at_response`` also the first response position P)
        predicts, per focus group g in {1, 2}, the number of objects in the group and, when the
        group is one cell, that cell's index, shape, colour and size (class 0: empty).
        Cross-entropies summed over the probes, averaged over the groups.

        These are the intermediate values every question family is computed from (the colour of
        the named object, the neighbour a relation points at, the two counts a comparison
        compares, the cells of a relation pair). Probes show the named cell's colour decodable at
        its image token but not where the answer is read: the answer loss alone, one token per
        question, teaches the copy slowly; this dense target teaches it on every question. Like
        the focus labels, the targets come from the scene generator and are never model inputs.
        """
        layer = self.cfg.readout_layer if self.cfg.readout_layer >= 0 else len(hidden) - 3
        state = hidden[layer][:, pos]  # (B, D)
        targets: dict[str, list[tuple[int, int]]] = {k: [] for k in head.readout}
        for b, e in enumerate(items):
            if e.scene < 0 or not e.focus:
                continue
            labels = {a: v[e.scene].tolist() for a, v in self.bank.labels.items()}  # the bank's per-cell labels
            for g, cells in enumerate(e.focus[:head.READOUT_GROUPS]):
                targets[f"{g}_count"].append((b, sum(labels["shape"][c] > 0 for c in cells)))
                if len(cells) == 1:
                    (c,) = cells
                    targets[f"{g}_cell"].append((b, c))
                    for a in ("shape", "colour", "size"):
                        targets[f"{g}_{a}"].append((b, labels[a][c]))
        return _probe_loss(head.readout, state, targets) / head.READOUT_GROUPS

    def _relate_loss(self, head: GroundHead, hidden: list[torch.Tensor], pos: int,
                     items: list[Example]) -> torch.Tensor:
        """Comparison readout on the state at ``pos`` (as the readout): for questions with two focus groups, the
        order of group 1 against group 2 as one of (<, =, >): their object counts and, when both
        groups are one cell, their rows and their columns; for every question with an image, the
        operator it applies (:data:`~mmdiff.data.questions.OPERATORS`: "left of", ..., "more",
        ...; or none). Cross-entropies summed over the probes.

        The yes/no families answer operator x order ("is the X left of the Y?" is col(X) < col(Y);
        "are there more X than Y?" is count(X) > count(Y)). ``bench/probes.py`` on a model trained
        with the readout alone (recipe v3): both orders are linearly readable at this state from
        block 4 (0.83-0.93), but the relation word, readable at 0.82 after block 2, falls to 0.49
        once the operands arrive, and pair relations stay near chance. The operator target keeps
        the word beside its operands (1.00 at every block in recipe v4), so the last block can
        combine them. It reads one block after the readout. Targets come from the scene generator
        and the question template.
        """
        from ..data.questions import OPERATORS, operator_of
        from ..data.scenes import GRID

        layer = self.cfg.relate_layer if self.cfg.relate_layer >= 0 else len(hidden) - 2
        state = hidden[layer][:, pos]
        targets: dict[str, list[tuple[int, int]]] = {k: [] for k in head.relate}

        def order(a: int, b: int) -> int:  # 0: a < b, 1: equal, 2: a > b
            return (a > b) - (a < b) + 1

        for b, e in enumerate(items):
            if e.scene < 0:
                continue
            op = operator_of(e.question)
            targets["op"].append((b, len(OPERATORS) if op is None else OPERATORS.index(op)))
            if len(e.focus) < 2:
                continue
            occupied = self.bank.labels["shape"][e.scene]  # (cells,): 0 = empty
            g1, g2 = e.focus[0], e.focus[1]
            targets["count"].append((b, order(int((occupied[list(g1)] > 0).sum()), int((occupied[list(g2)] > 0).sum()))))
            if len(g1) == 1 and len(g2) == 1:
                targets["row"].append((b, order(g1[0] // GRID, g2[0] // GRID)))
                targets["col"].append((b, order(g1[0] % GRID, g2[0] % GRID)))
        return _probe_loss(head.relate, state, targets)

    def _ctc_loss(self, head: nn.Module, idx: list[int], speech: SpeechBank | None = None):
        """CTC loss of the speech encoder + head on the transcripts of clips ``idx``."""
        speech = speech or self.speech
        feats, mask = self.model.audio.batch_mels([speech.mels[i] for i in idx])
        if self.cfg.vtlp > 0:
            feats = vtlp(feats, random.Random(idx[0] * 104729 + len(idx)), max_warp=self.cfg.vtlp)
        if self.cfg.spec_augment:
            feats = spec_augment(feats, random.Random(idx[0] * 7919 + len(idx)))
        out = self.model.audio(feats, mask)
        logp = head(out.last).float().log_softmax(-1)  # (B, T', V+1)
        targets = [torch.tensor(self.batcher.answer_ids(speech.qas[i].question)) for i in idx]
        loss = F.ctc_loss(logp.transpose(0, 1), torch.cat(targets), mask.sum(-1), torch.tensor([len(t) for t in targets]),
                          blank=logp.shape[-1] - 1, zero_infinity=True)
        return loss, int(mask.sum())

    @torch.no_grad()
    def _asr_eval(self, head: nn.Module) -> dict[str, float]:
        """Greedy CTC transcripts of the validation clips: word error rate and exact match."""
        self.model.audio.eval()
        speech = self.val_speech
        refs, hyps = [], []
        for i in range(0, len(speech), 64):
            idx = list(range(i, min(i + 64, len(speech))))
            feats, mask = self.model.audio.batch_mels([speech.mels[k] for k in idx])
            out = self.model.audio(feats, mask)
            logp = head(out.last).log_softmax(-1)
            for k, ids in zip(idx, ctc_greedy(logp, mask.sum(-1), logp.shape[-1] - 1)):
                refs.append(normalize(speech.qas[k].question))
                hyps.append(normalize(self.model.tokenizer.decode(ids)))
        self.model.audio.train()
        return {"wer": word_error_rate(refs, hyps), "exact": sum(r == h for r, h in zip(refs, hyps)) / len(refs)}

    @torch.no_grad()
    def _cell_accuracy(self, head: CellHead) -> dict[str, float]:
        self.model.vision.eval()
        logits = head(self.model.vision(self.val.pixels.float()))
        self.model.vision.train()
        return {k: (v.argmax(-1) == self.val.labels[k]).float().mean().item() for k, v in logits.items()}
