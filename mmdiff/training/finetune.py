"""Fine-tuning a trained model on users' data: ``mmdiff train --data TRAIN --init MODEL --out DIR``.

The hybrid recipe (Dimple, Yu et al. 2025) applied to any dataset :func:`mmdiff.data.readers.read_dataset`
reads: optional AR steps (causal mask, next-token loss), then masked-diffusion steps (LLaDA SFT,
Nie et al. 2025, Eq. 5; :mod:`mmdiff.losses`). Every assistant turn of a conversation is a training
item whose prompt is the conversation up to its question (chat template, media after the first
question) and whose response is its answer + EOS, EOS-filled to a canvas of random length: the loss
covers answers only, never the prompt. Images of any size and aspect ratio are padded to a square
and resized by the vision encoder's own preprocessing, once.

New words (a colour or shape mmdiff never saw) are learnt through mmdiff's byte-level BPE pieces:
every word already tokenizes, and training the decoder's embeddings and output head on the pieces
makes it emit them; no token is added, so the output directory keeps the tokenizer, the vocabulary
size and the structure priors of its base (``bench/results/byod.md`` measures the new words' accuracy).

What trains (``train``): any of ``vision``, ``vision_adapter``, ``audio``, ``audio_adapter``,
``decoder``, or the groups ``adapters``, ``encoders``, ``all`` (the default: everything but the Whisper encoder
and a vision tower marked ``frozen``, e.g. the pretrained ``timm_cnn`` one, whose features are then computed
once; ``--train vision`` or ``encoders`` trains it); ``lora`` puts LoRA adapters (``peft``,
:mod:`mmdiff.training.lora`) on the decoder's linear layers instead of training it whole (for released
7-8B decoders loaded with :func:`mmdiff.load`); ``out`` holds them merged into the weights, the
resumable state the un-merged base and the adapters apart.

Forgetting: with ``replay`` > 0 that share of each batch is drawn from the synthetic world the shipped
model was trained on (test scenes never appear), so its own skills keep being rehearsed; on by
default for mmdiff models with a vision encoder. When the model also has an audio path, a share
(``replay_spoken``) of the replayed questions is spoken, as in the recipe's audio batches (spoken VQA
and ASR; a few hundred espeak-ng clips synthesised once), so the decoder keeps reading its speech path;
as in the recipe's decoder stages, the answer loss on these items does not train the speech path itself.

Validation (per question type, ``mmdiff eval``'s exact match, on ``val`` or rows held out from the
training data) picks the best checkpoint, which is what ``out`` holds; the run resumes from
``<out>.train_state`` and is data parallel under torchrun.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..data.questions import QUESTION_TYPES, ask
from ..data.readers import Conversation, ReadResult, read_usable
from ..data.speech import NO_SYNTHESISER, espeak_available
from ..evaluation.canvas import canvas_length
from ..evaluation.metrics import exact_match
from ..io import JsonConfig, check_output_dir, config_from_dict, read_json, write_json
from ..losses import ar_loss, diffusion_loss, forward_mask
from ..model import PARTS, MultimodalDiffusionLM
from ..sampling import DecodeConfig, SamplerConfig
from ..sampling.autoregressive import ar_generate
from .banks import SpeechBank, audio_batch, frozen_features
from .batches import response_canvas, spoken_examples
from .distributed import allreduce_grads, dist_info, sync_params
from .lora import LORA_NAME, add_lora, load_lora, lora_state, merge_lora, without_lora
from .state import STATE_NAME, append_log, check_same_run, load_optimizer, save_state, warmup_cosine

log = logging.getLogger("mmdiff")

GROUPS: dict[str, tuple[str, ...]] = {"all": ("vision", "vision_adapter", "audio_adapter", "decoder"),
                                      "adapters": ("vision_adapter", "audio_adapter"),
                                      "encoders": ("vision", "audio")}
LORA = "lora"
#: short world questions replayed (captions need the long canvas: left out of replay)
REPLAY_TYPES = tuple(t for t in QUESTION_TYPES if t not in ("caption", "caption_json"))
SHORT_CANVAS = 8
#: share of the spoken replay items that are ASR ("transcribe the audio."), the shipped recipe's asr_fraction
REPLAY_ASR = 0.3
#: the media path (encoders and adapters): a foreign image set moves it furthest from where it was trained
MEDIA_PARTS = ("vision", "vision_adapter", "audio", "audio_adapter")


@dataclass
class FinetuneConfig(JsonConfig):
    """A fine-tune run; every field is a flag of ``mmdiff train`` (or a key of a ``--config`` JSON)."""

    data: str  # training data (any format of mmdiff.data.readers)
    init: str  # the model directory to start from
    out: str  # output model directory (the best checkpoint)
    val: str | None = None  # validation data (None: val_rows held out from data)
    format: str = "auto"  # dataset format: auto | mmdiff | llava | hf
    train: list[str] = field(default_factory=lambda: ["all"])  # parts with gradients (see GROUPS, lora)
    steps: int = 4000  # masked-diffusion steps (at most: see stop_at)
    ar_steps: int = 0  # AR (phase-1) steps before them
    batch_size: int = 32
    lr: float = 5e-4
    media_lr_scale: float = 1.0  # the encoders' and adapters' learning rate is lr times this
    warmup: int = 50
    weight_decay: float = 0.01
    replay: float = -1.0  # share of each batch from the original world (-1: 0.25 when the model can, else 0)
    replay_scenes: int = 3000  # world scenes rendered for replay
    #: share of the replayed questions that are spoken (spoken VQA and ASR, as the recipe's audio batches) when
    #: the model has an audio path and espeak-ng is available, so its speech is rehearsed too (0 = off)
    replay_spoken: float = 0.1
    replay_clips: int = 300  # spoken questions synthesised once, at the start, for it
    val_rows: int = 300  # questions held out from data when no val is given
    eval_every: int = 250  # validation interval in steps (0: only at the end)
    stop_at: float = 0.99  # stop once validation accuracy reaches this (1.0: never stop early)
    save_every: int = 100  # resumable state interval in steps
    max_answer_tokens: int = 64  # longer answers are skipped (counted)
    lora_rank: int = 16
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch default)

    def __post_init__(self) -> None:
        """Refuse values no run can use, by flag, before any work (one clear line each)."""
        if not self.train:
            raise ValueError("--train: no part given; e.g. all, adapters, decoder or lora")
        trainable_parts(self.train)  # unknown names fail before any data is read
        for flag, value, least in (("--steps", self.steps, 0), ("--ar-steps", self.ar_steps, 0),
                                   ("--batch-size", self.batch_size, 1), ("--lora-rank", self.lora_rank, 1),
                                   ("--replay-clips", self.replay_clips, 1)):
            if value < least:
                raise ValueError(f"{flag} {value}: must be at least {least}")
        if self.steps + self.ar_steps < 1:
            raise ValueError("--steps 0 and --ar-steps 0: nothing to train; give at least one step")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr {self.lr}: must be a positive number")
        if self.replay != -1.0 and not 0.0 <= self.replay < 1.0:
            raise ValueError(f"--replay {self.replay}: must be a share in [0, 1) (0 = off)")
        if not 0.0 <= self.replay_spoken <= 1.0:
            raise ValueError(f"--replay-spoken {self.replay_spoken}: must be a share in [0, 1] (0 = off)")

    @classmethod
    def from_file(cls, path: str | Path) -> "FinetuneConfig":
        return config_from_dict(cls, read_json(path), source=str(path))


@dataclass
class Item:
    """One training / validation question: prompt ids, answer ids, image slot, kind, reference answers."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    image: int  # row of the pixel store (-1: none)
    type: str
    answers: list[str]
    audio: Any = None  # the user's clip (a path), or None
    clip: int = -1  # replay: the speech bank's clip (-1: none)


def trainable_parts(names: list[str], frozen: tuple[str, ...] = ()) -> list[str]:
    """Expand groups; refuse unknown names. ``all`` leaves out the ``frozen`` parts (a pretrained tower the
    model keeps as it is, :attr:`~mmdiff.encoders.vision.VisionEncoderConfig.frozen`); naming one, or the
    ``encoders`` group, trains it."""
    out: list[str] = []
    for n in names:
        if n in GROUPS:
            out += [p for p in GROUPS[n] if n != "all" or p not in frozen]
        elif n in PARTS or n == LORA:
            out.append(n)
        else:
            raise ValueError(f"--train: unknown part {n!r}; known: {', '.join([*GROUPS, *PARTS, LORA])}")
    return list(dict.fromkeys(out))


def load_init(path: str | Path) -> MultimodalDiffusionLM:
    """The model to start from, or one clear error."""
    from ..loading import load

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--init {path}: not a model directory (it does not exist)")
    try:
        return load(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--init {path}: not a model directory mmdiff can load ({e})") from None


def image_key(c: Conversation) -> str:
    """What identifies a conversation's image (a path, a decoded image object, or the record when none)."""
    return f"id:{c.id}" if c.image is None else _image_id(c.image)


def _image_id(image: Any) -> str:
    """A path's text, or the identity of a decoded image object (one per object)."""
    return str(image) if isinstance(image, (str, Path)) else f"obj:{id(image)}"


class PixelStore:
    """Every distinct image preprocessed once for the vision encoder (float16)."""

    def __init__(self, model: MultimodalDiffusionLM) -> None:
        self.model, self.keys, self.images = model, {}, []
        self.pixels: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def slot(self, image: Any) -> int:
        key = _image_id(image)  # decoded images: one slot per object
        if key not in self.keys:
            self.keys[key] = len(self.images)
            self.images.append(image)
        return self.keys[key]

    def build(self, extra: torch.Tensor | None = None, chunk: int = 512, progress: bool = True) -> None:
        """Preprocess the collected images (+ already preprocessed ``extra`` rows appended after them)."""
        vision = self.model.vision
        parts = [vision.preprocess(self.images[i:i + chunk]).half()
                 for i in tqdm(range(0, len(self.images), chunk), desc="preprocessing images", leave=False,
                               disable=not progress)]
        if extra is not None:
            parts.append(extra.half())
        self.pixels = torch.cat(parts) if parts else None

    @torch.no_grad()
    def encode(self, batch: int = 256) -> None:
        """Cache the frozen vision encoder's features (when the encoder does not train)."""
        v = self.model.vision
        was = v.training
        v.eval()
        self.features = frozen_features(v, self.pixels, batch)
        v.train(was)


class FineTuner:
    """Runs a :class:`FinetuneConfig` (module docstring).

    Args:
        cfg: the run.
        resume: continue from ``<out>.train_state`` when it exists.
        progress: tqdm bars (rank 0).
    """

    def __init__(self, cfg: FinetuneConfig, *, resume: bool = True, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.rank, self.world = dist_info()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.state_dir = self.out.with_name(self.out.name + ".train_state")
        self.log_path = self.out.with_name(self.out.name + ".train_log.jsonl")
        # data first: a dataset with no usable row fails before any model is loaded
        self.train_data = read_usable(cfg.data, fmt=cfg.format, name="--data", say=self._say)
        self.val_data: ReadResult | None = None
        if cfg.val:
            self.val_data = read_usable(cfg.val, fmt=cfg.format, name="--val", say=self._say)
        self.model = load_init(cfg.init)
        vision = self.model.cfg.vision
        self.parts = trainable_parts(cfg.train, frozen=("vision",) if vision is not None and vision.frozen else ())
        self.state: dict[str, Any] = {"step": 0, "best": -1.0, "best_step": 0}
        resuming = resume and (self.state_dir / STATE_NAME).exists()
        if resuming:
            self.state = read_json(self.state_dir / STATE_NAME)
            check_same_run(self.state_dir, self.state, cfg.to_dict(), other="with other settings")
            self.model = MultimodalDiffusionLM.from_pretrained(self.state_dir)
            self._say(f"resuming from {self.state_dir} at step {self.state['step']}")
        elif self.rank == 0 and self.log_path.exists():
            self.log_path.unlink()
        self.replay = cfg.replay if cfg.replay >= 0 else (0.25 if self._world_model() else 0.0)
        if self.replay > 0 and not self._world_model():
            raise ValueError("--replay needs an mmdiff model with a vision encoder (it rehearses the synthetic world)")
        torch.manual_seed(cfg.seed)
        self._prepare()

    # -- data ---------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def _world_model(self) -> bool:
        """Whether the model can rehearse the synthetic world: mmdiff's own tokenizer and a vision encoder."""
        from ..checkpoints import ReleasedTokenizer

        return self.model.vision is not None and not isinstance(self.model.tokenizer, ReleasedTokenizer)

    def _items(self, conversations: list[Conversation], store: PixelStore | None, skipped: dict[str, int]) -> list[Item]:
        """Every assistant turn as an :class:`Item` (answers too long for the model are skipped and counted)."""
        m, cfg = self.model, self.cfg
        limit = m.cfg.decoder.max_seq_len
        if m.vision is not None and not hasattr(self, "media_tokens"):
            with torch.no_grad():  # how many positions one image takes in the prompt
                from PIL import Image

                probe = m.vision.preprocess([Image.new("RGB", (8, 8))]).to(m.device)
                self.media_tokens = m.adapt_image(m.vision(probe)).shape[1]
        out = []
        for c in conversations:
            slot = -1
            if c.image is not None:
                if m.vision is None:
                    skipped["an image but the model has no vision encoder"] += 1
                    continue
                slot = store.slot(c.image)
            history: list[tuple[str, str]] = []
            for t in c.turns:
                prompt = tuple(m.format_prompt(t.question, n_images=int(slot >= 0), n_audio=int(c.audio is not None),
                                               history=history))
                answer = tuple(m.tokenizer(t.answers[0], add_special_tokens=False)["input_ids"])
                media = self.media_tokens if slot >= 0 else 0
                if len(answer) + 1 > cfg.max_answer_tokens:
                    skipped[f"answer longer than {cfg.max_answer_tokens} tokens"] += 1
                elif len(prompt) + media + len(answer) + 1 > limit:
                    skipped[f"prompt + answer longer than the model's context ({limit})"] += 1
                else:
                    out.append(Item(prompt, answer, slot, t.type, t.answers, c.audio))
                history.append((t.question, t.answers[0]))
        return out

    def _prepare(self) -> None:
        """Items, the pixel store (user images, then replay scenes) and the validation set."""
        cfg = self.cfg
        self.store = PixelStore(self.model) if self.model.vision is not None else None
        skipped: dict[str, int] = defaultdict(int)
        convs = self.train_data.conversations
        if self.val_data is not None:
            train_convs, val_convs = convs, self.val_data.conversations
        else:  # hold out every question of some images (no image in both) until val_rows, at most a tenth
            groups: dict[str, list[int]] = defaultdict(list)
            for i, c in enumerate(convs):
                groups[image_key(c)].append(i)
            keys = sorted(groups)
            random.Random(f"val-{cfg.seed}").shuffle(keys)
            want = min(cfg.val_rows, sum(len(c.turns) for c in convs) // 10)
            held: set[int] = set()
            n_held = 0
            for k in keys:
                if n_held >= want:
                    break
                held.update(groups[k])
                n_held += sum(len(convs[i].turns) for i in groups[k])
            train_convs = [c for i, c in enumerate(convs) if i not in held]
            val_convs = [c for i, c in enumerate(convs) if i in held]
        train = self._items(train_convs, self.store, skipped)
        val = self._items(val_convs, self.store, skipped)
        for reason, n in skipped.items():
            self._say(f"  skipped {n} question(s): {reason}")
        if not train:
            raise ValueError(f"--data {cfg.data}: no usable questions for this model ({dict(skipped)})")
        self.train_items, self.val_items = train, val
        longest: dict[str, int] = defaultdict(int)
        for it in train + val:
            longest[it.type] = max(longest[it.type], len(it.answer))
        # each kind trains on canvases up to the one mmdiff eval gives it (its longest answer + EOS, rounded up)
        self.type_canvas = {t: max(SHORT_CANVAS, canvas_length(n)) for t, n in longest.items()}
        self.canvas = max(self.type_canvas.values())
        self.bank = None
        self.speech: SpeechBank | None = None
        extra = None
        if self.replay > 0:
            from .banks import SceneBank

            self.bank = SceneBank.build(self.model, split="train", n=cfg.replay_scenes, seed=cfg.seed + 7,
                                        desc="rendering replay scenes", progress=self.progress)
            extra = self.bank.pixels
            self.speech = self._replay_speech()
        if self.store is not None:
            n_user = len(self.store.images)
            self.store.build(extra, progress=self.progress and self.rank == 0)
            self.replay_offset = n_user
            if "vision" not in self.parts and self.store.pixels is not None:
                self.store.encode()
        spoken = f" ({cfg.replay_spoken:.0%} of it spoken)" if self.speech is not None else ""
        self._say(f"fine-tuning on {len(train)} questions ({len(val)} for validation), canvas up to {self.canvas}, "
                  f"replay {self.replay:.0%}{spoken}, training {', '.join(self.parts)}")

    def _replay_speech(self) -> SpeechBank | None:
        """Spoken questions about replay scenes (the recipe's :class:`~mmdiff.training.banks.SpeechBank`),
        synthesised once; None when the model has no audio path, ``replay_spoken`` is 0 or no synthesiser
        is installed (said in one line)."""
        cfg, m = self.cfg, self.model
        if cfg.replay_spoken <= 0 or m.audio is None or m.audio_adapter is None:
            return None
        if not espeak_available():
            self._say(f"replay: no spoken questions ({NO_SYNTHESISER}); the speech path is not rehearsed")
            return None
        speech = SpeechBank.build(m, self.bank, n=cfg.replay_clips, split="train", seed=cfg.seed + 11,
                                  desc="synthesising replay speech", progress=self.progress and self.rank == 0)
        if "audio" not in self.parts:
            speech.encode(m)  # a frozen speech encoder: its states once
        return speech

    # -- batches ------------------------------------------------------------------------------------
    def _replay_items(self, rng: random.Random, n: int) -> list[Item]:
        m, out = self.model, []
        if self.speech is not None:  # spoken VQA and ASR items, as the recipe's audio batches
            n_spoken = sum(rng.random() < self.cfg.replay_spoken for _ in range(n))
            for e in spoken_examples(self.speech, rng, n_spoken, asr_fraction=REPLAY_ASR):
                out.append(Item(tuple(m.format_prompt(e.question, n_images=int(e.scene >= 0), n_audio=1)),
                                tuple(m.tokenizer(e.answer, add_special_tokens=False)["input_ids"]),
                                self.replay_offset + e.scene if e.scene >= 0 else -1, e.type, [e.answer],
                                clip=e.clip))
        while len(out) < n:
            i = rng.randrange(len(self.bank.scenes))
            qa = ask(self.bank.scenes[i], rng, rng.choice(REPLAY_TYPES))
            if qa is not None:
                out.append(Item(tuple(m.format_prompt(qa.question, n_images=1)),
                                tuple(m.tokenizer(qa.answers[0], add_special_tokens=False)["input_ids"]),
                                self.replay_offset + i, qa.type, qa.answers))
        return out

    def _embed(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        images: list[list[torch.Tensor]] = [[] for _ in items]
        audios: list[list[torch.Tensor]] = [[] for _ in items]
        with_img = [b for b, it in enumerate(items) if it.image >= 0]
        if with_img:
            idx = torch.tensor([items[b].image for b in with_img])
            if self.store.features is not None:
                feats = self.store.features[idx].float()
            else:
                feats = m.vision(self.store.pixels[idx].float().to(m.device))  # (B', N, C)
            for b, t in zip(with_img, m.adapt_image(feats.to(m.device))):
                images[b] = [t]
        with_aud = [b for b, it in enumerate(items) if it.audio is not None]
        if with_aud:
            for b, t in zip(with_aud, m.encode_audio([items[b].audio for b in with_aud])):
                audios[b] = [t]
        with_clip = [b for b, it in enumerate(items) if it.clip >= 0]
        if with_clip:
            for b, t in zip(with_clip, self._replay_audio([items[b].clip for b in with_clip])):
                audios[b] = [t]
        return m.embed_prompt([it.prompt for it in items], images=images, audios=audios)

    @torch.no_grad()
    def _replay_audio(self, clips: list[int]) -> list[torch.Tensor]:
        """(N_i, D) audio tokens of speech-bank clips. No gradient: as in the recipe's decoder stages, the
        answer loss trains the decoder to read the speech path, never the path itself (a CTC adapter is
        trained by its CTC loss only)."""
        m = self.model
        if self.speech.features is not None:  # the frozen encoder's cached states
            out = audio_batch([self.speech.features[k] for k in clips])
        else:
            feats, mask = m.audio.batch_mels([self.speech.mels[k] for k in clips])  # (B', n_mels, T), (B', T/2)
            out = m.audio(feats.to(m.device), mask.to(m.device))
        tokens, keep = m.adapt_audio(out)  # (B', N, D), (B', N)
        return [t[k] for t, k in zip(tokens, keep)]

    def _response(self, items: list[Item], L: int, *, eos_fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sp = self.model.special
        fill = sp.eos if eos_fill else sp.pad
        answers = [list(it.answer)[:L - 1] + [sp.eos] for it in items]
        return response_canvas(answers, L, fill=fill, eos_fill=eos_fill)

    def _loss(self, step: int, rng: random.Random) -> torch.Tensor:
        cfg, m = self.cfg, self.model
        n_replay = round(cfg.batch_size * self.replay)
        items = [self.train_items[rng.randrange(len(self.train_items))] for _ in range(cfg.batch_size - n_replay)]
        items += self._replay_items(rng, n_replay) if n_replay else []
        longest = max(len(it.answer) for it in items) + 1
        widest = max(self.type_canvas.get(it.type, SHORT_CANVAS) for it in items)
        L = rng.randint(longest, max(longest, widest))  # the model learns to end with EOS on any canvas
        ar = step < cfg.ar_steps
        response, loss_mask = self._response(items, L, eos_fill=not ar)
        embeds, valid = self._embed(items)
        response = response.to(m.device)
        if ar:
            _, out = m.decoder.forward_response(embeds, valid, response, attn_mode="causal")
            return ar_loss(out.logits, response.masked_fill(~loss_mask.to(m.device), -100), embeds.shape[1])
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        targets, masked, t = forward_mask(response, generator=g)
        noisy = targets.masked_fill(masked.to(m.device), m.special.mask)
        logits, _ = m.decoder.forward_response(embeds, valid, noisy, attn_mode=m.cfg.decoder.attn_mode)
        return diffusion_loss(logits, targets, masked.to(m.device), t.to(m.device))

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, items: list[Item] | None = None, batch: int = 64, *, ar: bool = False) -> dict[str, float]:
        """Exact match (``mmdiff eval``'s metric) per question type and ``overall`` (over questions),
        each type decoded on the canvas ``mmdiff eval`` would give it, one token per step (``ar``: KV-cached
        greedy left-to-right decoding, for the AR phase)."""
        m = self.model
        items = self.val_items if items is None else items
        was = m.training
        m.eval()
        by_type: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_type[it.type].append(it)
        acc, right = {}, 0
        for qtype, group in sorted(by_type.items()):
            L = canvas_length(max(len(it.answer) for it in group))
            decode = DecodeConfig(sampler=SamplerConfig(gen_length=L, steps=L, block_length=L), cache=m.exact_cache)
            hits = 0
            for i in range(0, len(group), batch):
                chunk = group[i:i + batch]
                embeds, valid = self._embed(chunk)
                if ar:
                    out = ar_generate(m.decoder, embeds, valid, max_new_tokens=L, eos_id=m.special.eos,
                                      pad_id=m.special.pad)
                else:
                    out = m.sample(embeds, valid, decode=decode)
                hits += sum(exact_match(m.decode(t.tolist()), it.answers) for t, it in zip(out.tokens, chunk))
            acc[qtype] = hits / len(group)
            right += hits
        acc["overall"] = right / max(1, len(items))
        m.train(was)
        return acc

    # -- main loop ----------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        cfg = self.cfg
        return warmup_cosine(step, cfg.lr, warmup=cfg.warmup, total=cfg.ar_steps + cfg.steps, floor=0.05)

    def _save_best(self) -> None:
        if LORA in self.parts:
            import copy

            merged = copy.deepcopy(self.model)  # the live model keeps its adapters
            merge_lora(merged)
            merged.save_pretrained(self.out)
        else:
            self.model.save_pretrained(self.out)

    def _save_state(self, opt: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        """The resumable state: the model (a LoRA run: the un-merged base and its adapters), AdamW's moments."""
        write = self._write_lora_state if LORA in self.parts else None
        save_state(self.state_dir, self.model, opt, state, write_model=write)

    def _write_lora_state(self, directory: Path) -> None:
        with without_lora(self.model):
            self.model.save_pretrained(directory)
        save_file(lora_state(self.model), str(directory / LORA_NAME))

    def _stop(self, done: int) -> bool:
        """Every rank stops together once rank 0's validation reached ``stop_at``."""
        flag = torch.tensor([float(self.rank == 0 and self.state["best"] >= self.cfg.stop_at)])
        if self.world > 1:
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            append_log(self.log_path, record)

    def run(self) -> dict[str, float]:
        """Train, validate, keep the best checkpoint in ``out``; returns its validation accuracy."""
        cfg, m = self.cfg, self.model
        total = cfg.ar_steps + cfg.steps
        m.train()
        m.freeze(PARTS)
        if LORA in self.parts:
            add_lora(m, self.cfg.lora_rank)
            if self.state["step"]:
                load_lora(m, self.state_dir / LORA_NAME)
        m.freeze([p for p in self.parts if p != LORA], frozen=False)
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad or "lora_" in n]
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        sync_params(params, self.world)
        media = [p for n, p in named if n.split(".")[0] in MEDIA_PARTS]
        rest = [p for n, p in named if n.split(".")[0] not in MEDIA_PARTS]
        opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": media, "scale": cfg.media_lr_scale}],
                                lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        start = self.state["step"]
        if start:
            load_optimizer(self.state_dir, m, opt, self.state.get("adam_steps", {}))
        t0 = time.perf_counter()
        bar = tqdm(range(start, total), desc="[fine-tune]", initial=start, total=total, dynamic_ncols=True,
                   disable=not self.progress or self.rank > 0)
        for step in bar:
            rng = random.Random(f"{cfg.seed}-{self.rank}-{step}")
            for g in opt.param_groups:
                g["lr"] = self._lr(step) * g["scale"]
            loss = self._loss(step, rng)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}; last checkpoint: {self.state_dir}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_grads(params, self.world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", phase="ar" if step < cfg.ar_steps else "diffusion")
                self._log({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time": time.time()})
            done = step + 1
            if self.rank == 0 and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total):
                acc = self.validate(ar=done <= cfg.ar_steps)
                self._say(f"[fine-tune] step {done} val " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
                self._log({"step": done, "val": acc, "elapsed_s": time.perf_counter() - t0})
                if done > cfg.ar_steps and acc["overall"] > self.state["best"]:  # ask / eval decode by diffusion
                    self.state.update(best=acc["overall"], best_step=done, best_val=acc)
                    self._save_best()
            if self._stop(done):
                self._say(f"[fine-tune] validation accuracy {self.state['best']:.3f} >= stop_at {cfg.stop_at}: "
                          f"stopping at step {done} of {total}")
                break
            if self.rank == 0 and done % cfg.save_every == 0 and done < total:
                self._save_state(opt, {**self.state, "step": done, "config": cfg.to_dict()})
        if self.rank == 0:
            self.state["step"] = total
            self._save_state(None, {**self.state, "config": cfg.to_dict()})
            write_json(self.out / "finetune.json", {"config": cfg.to_dict(), "best_step": self.state["best_step"],
                                                   "val": self.state.get("best_val", {})})
            self._say(f"wrote {self.out} (best validation {self.state['best']:.3f} at step {self.state['best_step']})")
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return self.state.get("best_val", {})


def check_writable(cfg: FinetuneConfig) -> None:
    """Refuse unwritable outputs before any work."""
    out = Path(cfg.out)
    check_output_dir(out, flag="--out")
    check_output_dir(out.with_name(out.name + ".train_state"), flag="--out")


#: the short families of the original typed test split (bench/quality.py's "typed, all short types")
ORIGINAL_TYPES = ("attribute", "existence", "count", "position", "relation", "comparison", "verify")


@torch.no_grad()
def original_accuracy(model_dir: str | Path, *, per_type: int = 100, seed: int = 0, batch: int = 32) -> dict[str, float]:
    """Exact match on the original world's typed test split, the same questions and decoding as
    ``bench/quality.py --per-type N`` (one token per step, prefix cache, 8-token canvas): per type and
    ``typed``, their mean. What forgetting is measured with."""
    from ..data.scenes import render, sample_scene

    model = MultimodalDiffusionLM.from_pretrained(model_dir)
    rng = random.Random(f"quality-{seed}")
    work: dict[str, list] = {t: [] for t in ORIGINAL_TYPES}
    while any(len(v) < per_type for v in work.values()):
        scene = sample_scene(rng, "test")
        image = render(scene, rng)
        for qtype in ORIGINAL_TYPES:
            if len(work[qtype]) < per_type:
                qa = ask(scene, rng, qtype)
                if qa is not None:
                    work[qtype].append((qa.question, qa.answers[0], image))
    decode = DecodeConfig(sampler=SamplerConfig(gen_length=SHORT_CANVAS), cache="prefix")
    acc = {}
    for qtype, rows in work.items():
        hits = 0
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            res = model.generate([q for q, _, _ in chunk], images=[im for _, _, im in chunk], decode=decode)
            hits += sum(exact_match(r.text, [a]) for r, (_, a, _) in zip(res, chunk))
        acc[qtype] = hits / len(rows)
    acc["typed"] = sum(acc[t] for t in ORIGINAL_TYPES) / len(ORIGINAL_TYPES)
    return acc
