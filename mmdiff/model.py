"""The multimodal masked-diffusion LM: encoders + adapters + decoder + tokenizer.

Named stages (LLaVA's ``encode_images`` = vision tower -> projector, and DIFFA's audio path):

* :meth:`MultimodalDiffusionLM.encode_image`: images -> vision encoder -> adapter -> (N, D) tokens,
* :meth:`MultimodalDiffusionLM.image_tokens`: each image's views (the whole image, or ``anyres``
  tiles + base view: :mod:`mmdiff.encoders.views`) through ``encode_image``, merged -> (N_i, D),
* :meth:`MultimodalDiffusionLM.encode_audio`: clips -> Whisper encoder -> adapter -> (N, D) tokens,
* :meth:`MultimodalDiffusionLM.embed_prompt`: token ids with ``<image>``/``<audio>`` placeholders ->
  embeddings with each placeholder replaced by its media tokens (left padded batch),
* :meth:`MultimodalDiffusionLM.forward`: prompt embeddings + response tokens -> response logits,
* :meth:`MultimodalDiffusionLM.generate`: the one sampler (``mmdiff.sampling``) on a prompt.

:meth:`MultimodalDiffusionLM.check_inputs` is what a question must satisfy before it is answered
(valid text; an image when the model has a vision encoder); :func:`mmdiff.search.answer`, the entry
of the CLI, the eval runner and the demo, applies it, while ``generate`` itself also takes text-only
prompts (tests, the training loop's validation).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import special_tokens as st
from .adapters import adapter_config_from_dict, build_adapter
from .adapters.ctc import LM_NAME, TokenNGram
from .decoder import Decoder, DecoderConfig, multimodal_positions
from .encoders import AudioEncoderConfig, VisionEncoderConfig, build_audio_encoder, build_vision_encoder
from .flops import FlopCounter
from .io import CONFIG_NAME, WEIGHTS_NAME, load_safetensors, load_state_checked, read_json, save_weights, write_json
from .media import load_image, read_question
from .sampling import DecodeConfig, Denoiser, SampleOutput, SamplerConfig, StepEvent, Strategy, sample
from .sampling.autoregressive import ar_generate
from .sampling.denoisers import build_denoiser
from .sampling.pruning import LayerPlanner
from .special_tokens import SpecialIds
from .tokenizer import load_tokenizer, save_tokenizer

log = logging.getLogger("mmdiff")

PARTS = ("vision", "vision_adapter", "audio", "audio_adapter", "decoder")
TEXT, IMAGE, AUDIO = 0, 1, 2  # what fills a prompt position (embed_prompt's ``kinds``)
MODEL_TYPE = "mmdiff"
#: a model with a vision encoder refuses a question that comes without an image (check_inputs)
NO_IMAGE = "no image: this model answers questions about an image; give one with the question"
NO_QUESTION = "empty question and no audio"
#: a model without the encoder refuses the medium (check_inputs): text-only LLaDA / Dream, image-only models
NO_VISION = "this model has no vision encoder, so it cannot read an image: ask without one"
NO_HEARING = "this model has no audio encoder, so it cannot hear a clip: ask without one"


@dataclass
class ModelConfig:
    """Every sub-config of a multimodal model; written as one ``config.json``."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: object | None = None  # encoders.VisionEncoderConfig
    vision_adapter: object | None = None  # adapters.AdapterConfig (its kind's subclass)
    audio: object | None = None  # encoders.AudioEncoderConfig
    audio_adapter: object | None = None  # adapters.AdapterConfig (its kind's subclass)

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **{k: None if getattr(self, k) is None else getattr(self, k).to_dict()
                                             for k in ("decoder", "vision", "vision_adapter", "audio", "audio_adapter")}}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config.json") -> "ModelConfig":
        data = dict(data)
        if data.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{source}: not an mmdiff multimodal model config (model_type != {MODEL_TYPE!r})")
        readers = {"decoder": DecoderConfig.from_dict, "vision": VisionEncoderConfig.from_dict,
                   "vision_adapter": adapter_config_from_dict, "audio": AudioEncoderConfig.from_dict,
                   "audio_adapter": adapter_config_from_dict}
        unknown = sorted(set(data) - set(readers))
        if unknown:
            raise ValueError(f"{source}: unknown sections {unknown}; known: {sorted(readers)}")
        return cls(**{k: None if data.get(k) is None else readers[k](data[k], source=f"{source} {k}")
                      for k in readers if k in data})


@dataclass
class GenerationResult:
    """One answer with its cost."""

    text: str
    tokens: list[int]
    nfe: int
    latency_s: float
    fixed_at: list[int] = field(default_factory=list)  # step at which each canvas token was fixed


class MultimodalDiffusionLM(nn.Module):
    """Encoders + adapters + masked-diffusion decoder, with a tokenizer.

    Args:
        cfg: the model configuration.
        tokenizer: a ``PreTrainedTokenizerFast`` holding mmdiff's special tokens.
    """

    def __init__(self, cfg: ModelConfig, tokenizer) -> None:
        super().__init__()
        adapters = {k: getattr(cfg, k).resolve(cfg.decoder) for k in ("vision_adapter", "audio_adapter")
                    if getattr(cfg, k) is not None}
        self.cfg = cfg = replace(cfg, **adapters)  # the adapters' decoder-dependent fields filled in
        self.tokenizer = tokenizer
        self.special = SpecialIds.from_tokenizer(tokenizer)
        self.decoder = Decoder(cfg.decoder)
        self.vision = self.vision_adapter = self.audio = self.audio_adapter = None
        if cfg.vision is not None:
            self.vision = build_vision_encoder(cfg.vision)
            self.vision_adapter = build_adapter(cfg.vision_adapter)
        if cfg.audio is not None:
            self.audio = build_audio_encoder(cfg.audio)
            self.audio_adapter = build_adapter(cfg.audio_adapter)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    # -- staged training --------------------------------------------------------------------------
    def freeze(self, parts: Sequence[str], frozen: bool = True) -> None:
        """Set ``requires_grad = not frozen`` on the named parts (see ``PARTS``)."""
        for p in parts:
            if p not in PARTS:
                raise ValueError(f"unknown part {p!r}; known: {PARTS}")
            module = getattr(self, p)
            if module is not None:
                module.requires_grad_(not frozen)

    # -- stages -----------------------------------------------------------------------------------
    def encode_image(self, images: Sequence) -> torch.Tensor | list[torch.Tensor]:
        """Images (paths or PIL) -> (B, N, D) decoder-space tokens: encoder then adapter. A
        native-resolution encoder (``qwen2_5_vl``) gives each image its own N: a list of (N_i, D)."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder, but an image was given")
        pixels = self.vision.preprocess(images).to(device=self.device)
        features = self.vision(pixels)
        if isinstance(features, list):
            return [self.adapt_image(f[None])[0] for f in features]
        return self.adapt_image(features)

    def image_tokens(self, images: Sequence) -> list[torch.Tensor]:
        """The tokens each image (path or PIL) puts in the prompt: (N_i, D) per image.

        The vision encoder's views strategy (:mod:`mmdiff.encoders.views`) cuts each image into the
        crops the tower sees; every crop goes through the tower and the adapter
        (:meth:`encode_image`), and the strategy merges their tokens (``anyres``: base view, then the
        tile map with the adapter's ``image_newline`` ending each row). A single view per image runs
        as one batch.
        """
        if self.vision is None:
            raise ValueError("this model has no vision encoder, but an image was given")
        views = self.vision.views
        if views.single and views.pool == "none":
            return list(self.encode_image(images))
        if views.single:  # pooled per view
            return [views.merge(t[None], None, grid=self.vision.grid, newline=None) for t in self.encode_image(images)]
        out = []
        for image in images:
            crops, layout = views.split(load_image(image), tile=self.vision.input_size)
            tokens = self.encode_image(crops)  # (V, N, D)
            out.append(views.merge(tokens, layout, grid=self.vision.grid, newline=self.vision_adapter.image_newline))
        return out

    def num_image_tokens(self, image) -> int:
        """How many prompt tokens ``image`` (path or PIL) becomes (:meth:`image_tokens`), without encoding it."""
        if self.vision is None:
            return 0
        per_view = self.vision_adapter.num_tokens(self.vision.num_tokens)
        if self.vision.views.single and self.vision.views.pool == "none":
            return per_view
        return self.vision.views.num_tokens(load_image(image).size, tile=self.vision.input_size, grid=self.vision.grid,
                                            n_per_view=per_view)

    def adapt_image(self, features: torch.Tensor) -> torch.Tensor:
        """Vision encoder tokens (B, N, C) -> (B, N', D) decoder-space tokens (see :meth:`_in_decoder_space`)."""
        return self._in_decoder_space(self.vision_adapter, self.vision_adapter(features))

    def _in_decoder_space(self, adapter: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """An adapter's output as decoder-space tokens (..., D). Adapters that emit vocabulary ids
        (``emits = "ids"``, e.g. ``vq_ids``: a discrete image tokenizer's codes) are embedded exactly as
        typed tokens; those that emit distributions over the first V' tokens of the vocabulary
        (``emits = "vocab"``, e.g. ``audio_ctc``) with the decoder's own token table: sum_v p(v) * E[v];
        the others already emit embeddings."""
        if adapter.emits == "embeddings":
            return tokens
        if adapter.emits == "ids":
            return self.decoder.embed(tokens)  # (..., D)
        table = self.decoder.embed_tokens.weight  # (V, D)
        return tokens.to(table.dtype) @ table[: tokens.shape[-1]]

    def encode_audio(self, clips: Sequence) -> list[torch.Tensor]:
        """Clips (paths or (array, rate)) -> list of (N_i, D) tokens (padding frames dropped)."""
        if self.audio is None:
            raise ValueError("this model has no audio encoder, but audio was given")
        feats, mask = self.audio.preprocess(clips)
        tokens, tmask = self.adapt_audio(self.audio(feats.to(self.device), mask.to(self.device)))
        return [t[m] for t, m in zip(tokens, tmask)]

    @property
    def transcribes(self) -> bool:
        """Whether the audio adapter hands the decoder a transcript (``audio_ctc``), which
        :meth:`transcribe` can show."""
        return self.audio is not None and hasattr(self.audio_adapter, "transcribe_ids")

    @property
    def exact_cache(self) -> str:
        """The cache that is exact for this model: ``prefix`` for models trained with the prefix-LM
        mask (the prompt never attends to the response), else ``none``."""
        return "prefix" if self.cfg.decoder.attn_mode == "prefix" else "none"

    @torch.no_grad()
    def transcribe(self, clips: Sequence, batch_size: int = 32) -> list[str]:
        """What a CTC audio adapter (``audio_ctc``) hears in each clip (path or (array, rate)): the token
        sequence it hands the decoder, decoded to text (the LM beam in eval mode when the model has a
        ``ctc_lm.json``, else best path)."""
        if not self.transcribes:
            raise ValueError("transcribe needs a model with an audio encoder and an audio_ctc adapter")
        out = []
        for i in range(0, len(clips), batch_size):
            feats, mask = self.audio.preprocess(list(clips[i:i + batch_size]))
            ids = self.audio_adapter.transcribe_ids(self.audio(feats.to(self.device), mask.to(self.device)))
            out += [self.tokenizer.decode(t) for t in ids]
        return out

    def adapt_audio(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio encoder output -> (tokens (B, N, D), mask (B, N)) in decoder space (see :meth:`_in_decoder_space`)."""
        tokens, mask = self.audio_adapter(features)
        return self._in_decoder_space(self.audio_adapter, tokens), mask

    def embed_prompt(self, prompts: Sequence[Sequence[int]], *, images: Sequence[Sequence[torch.Tensor]] | None = None,
                     audios: Sequence[Sequence[torch.Tensor]] | None = None, return_kinds: bool = False):
        """Replace each placeholder by its media tokens; left-pad the batch.

        Args:
            prompts: token ids per sample, with ``<image>`` / ``<audio>`` placeholder tokens.
            images: per sample, the (N, D) token tensors of its images, in placeholder order.
            audios: per sample, the (N, D) token tensors of its clips, in placeholder order.
            return_kinds: also return what fills each position (:data:`TEXT`, :data:`IMAGE`,
                :data:`AUDIO`; padding is TEXT), e.g. the image positions that token pruning needs.

        Returns:
            embeds (B, T, D) and valid (B, T) bool (False at left padding) [, kinds (B, T) long].
        """
        B = len(prompts)
        images = images or [[] for _ in range(B)]
        audios = audios or [[] for _ in range(B)]
        rows, kinds_rows = [], []
        for b, ids in enumerate(prompts):
            media = {self.special.image: list(images[b]), self.special.audio: list(audios[b])}
            for token, name in ((self.special.image, "image"), (self.special.audio, "audio")):
                n_ph = sum(1 for t in ids if t == token)
                if n_ph != len(media[token]):
                    raise ValueError(f"prompt {b} has {n_ph} <{name}> placeholder(s) but {len(media[token])} {name}(s) were given")
            text = self.decoder.embed(torch.as_tensor(list(ids), dtype=torch.long, device=self.device))  # (T, D)
            parts, row_kinds, start = [], [], 0
            for i, t in enumerate(ids):
                if t in media and t is not None:
                    tokens = media[t].pop(0).to(text.dtype)
                    parts += [text[start:i], tokens]
                    row_kinds += [TEXT] * (i - start) + [IMAGE if t == self.special.image else AUDIO] * tokens.shape[0]
                    start = i + 1
            parts.append(text[start:])
            row_kinds += [TEXT] * (len(ids) - start)
            rows.append(torch.cat(parts, dim=0))
            kinds_rows.append(row_kinds)
        T = max(r.shape[0] for r in rows)
        D = rows[0].shape[1]
        embeds = rows[0].new_zeros(B, T, D)
        valid = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        kinds = torch.full((B, T), TEXT, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            embeds[b, T - r.shape[0]:] = r
            valid[b, T - r.shape[0]:] = True
            kinds[b, T - r.shape[0]:] = torch.tensor(kinds_rows[b], dtype=torch.long)
        return (embeds, valid, kinds) if return_kinds else (embeds, valid)

    def forward(self, prompt_embeds: torch.Tensor, prompt_valid: torch.Tensor, response: torch.Tensor, *,
                attn_mode: str | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for the response positions, aligned (position i predicts token i).

        Meant for the bidirectional / prefix masks of masked diffusion; the causal AR phase reads
        next-token logits from the decoder directly (``training.losses.ar_loss``). ``positions``:
        (3, B, P) M-RoPE prompt positions (:meth:`prepare`), None to count over valid tokens.
        """
        return self.decoder.forward_response(prompt_embeds, prompt_valid, response, attn_mode=attn_mode,
                                             prompt_positions=positions)[0]

    # -- prompts ----------------------------------------------------------------------------------
    def format_prompt(self, question: str, *, n_images: int = 0, n_audio: int = 0,
                      history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Chat-formatted prompt ids: the question, then the audio, then the image placeholders.

        Media come after the question so that, even under the causal mask of the AR phase, image
        tokens can attend to the (typed or spoken) question: the decoder then computes question-
        conditioned cell features, the grounding the training recipe supervises. With ``history``
        (earlier (question, answer) turns of a conversation) the media follow the first question.
        """
        turns = [*history, (question, None)]
        messages = []
        for k, (q, a) in enumerate(turns):
            messages.append({"role": "user", "content": q + (st.AUDIO * n_audio + st.IMAGE * n_images if k == 0 else "")})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, tokens: Sequence[int]) -> str:
        """Response tokens -> text: cut at the first EOS, drop PAD/MASK and special tokens."""
        out = []
        for t in tokens:
            if t == self.special.eos:
                break
            if t not in (self.special.pad, self.special.mask):
                out.append(int(t))
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    # -- generation -------------------------------------------------------------------------------
    def check_inputs(self, questions: Sequence[str | bytes], *, images: Sequence, audios: Sequence) -> list[str]:
        """Refuse what this model cannot answer, with the reason; returns the questions as text.

        A question must be valid text (:func:`mmdiff.media.read_question`: UTF-8, no control
        characters; the length limit is the CLI's and the demo's, not a data set's) and, without a
        spoken question, not empty. A model without a vision (audio) encoder refuses an image (a clip):
        a text-only LLaDA or Dream never answers as if it had seen it. A model with a vision
        encoder answers questions about an image, so a typed or spoken question needs one; only a
        typed question about a clip (e.g. "transcribe the audio.") may come without.

        Args:
            questions: text per sample ("" for a spoken question).
            images: per sample an image or None.
            audios: per sample a clip or None.

        Raises:
            ValueError: the first sample refused (prefixed "sample i: " in a batch of several).
        """
        if not len(questions) == len(images) == len(audios):
            raise ValueError(f"{len(questions)} questions but {len(images)} images and {len(audios)} audio entries")
        checked = []
        for b, (question, image, audio) in enumerate(zip(questions, images, audios)):
            where = f"sample {b}: " if len(questions) > 1 else ""
            try:
                question = read_question(question, max_chars=None)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
            typed = bool(question.strip())
            if image is not None and self.vision is None:
                raise ValueError(where + NO_VISION)
            if audio is not None and self.audio is None:
                raise ValueError(where + NO_HEARING)
            if not typed and audio is None:
                raise ValueError(where + NO_QUESTION)
            if self.vision is not None and image is None and not (typed and audio is not None):
                raise ValueError(where + NO_IMAGE)
            checked.append(question)
        return checked

    @torch.no_grad()
    def generate(self, questions: Sequence[str] | str, *, images: Sequence | None = None,
                 audios: Sequence | None = None, decode: DecodeConfig | None = None,
                 strategies: Sequence[Strategy] = (), callback: Callable[[StepEvent], None] | None = None,
                 counter: FlopCounter | None = None) -> list[GenerationResult]:
        """Answer a batch by plain decoding: one question (may be "") with optional one image and/or
        one clip per sample.

        Args:
            questions: text per sample.
            images: per sample an image (path / PIL) or None.
            audios: per sample a clip (path / (array, rate)) or None.
            decode: sampler, cache, pruning settings (:class:`~mmdiff.sampling.DecodeConfig`); a
                test-time search is run by :func:`mmdiff.search.search` / :func:`mmdiff.search.answer`,
                so ``decode.search`` must be off here.
            strategies: sampler strategy hooks (structure priors, ...).
            callback: sees every denoising step.
            counter: accumulates the decoder FLOPs per answer.
        """
        decode = decode or DecodeConfig()
        if decode.search.active:
            raise ValueError(f"generate decodes plainly but a {decode.search.strategy} search is set: "
                             "use mmdiff.search.answer (or search) for a test-time search")
        t0 = time.perf_counter()
        embeds, valid, kinds, positions = self.prepare(questions, images=images, audios=audios, return_positions=True)
        out = self.sample(embeds, valid, kinds=kinds, positions=positions, decode=decode, strategies=strategies,
                          callback=callback, counter=counter)
        return self._results(out, time.perf_counter() - t0)

    @torch.no_grad()
    def generate_ar(self, questions: Sequence[str] | str, *, images: Sequence | None = None,
                    audios: Sequence | None = None, max_new_tokens: int = 8) -> list[GenerationResult]:
        """Answer left to right with KV-cached greedy AR decoding (for a causal, phase-1 checkpoint:
        the same-size autoregressive baseline). Arguments as in :meth:`generate`."""

        t0 = time.perf_counter()
        if self.cfg.decoder.mrope_section is not None and images is not None and any(i is not None for i in images):
            raise ValueError("the AR baseline decodes with 1-D positions: not for M-RoPE models (Dimple) with an image")
        embeds, valid, _ = self.prepare(questions, images=images, audios=audios)
        out = ar_generate(self.decoder, embeds, valid, max_new_tokens=max_new_tokens, eos_id=self.special.eos,
                          pad_id=self.special.pad)
        return self._results(out, time.perf_counter() - t0)

    def prepare(self, questions: Sequence[str] | str, *, images: Sequence | None = None,
                audios: Sequence | None = None, return_positions: bool = False):
        """Encode the media and embed the chat prompts of a batch (see :meth:`generate`).

        Args:
            return_positions: also return the prompt's M-RoPE positions (:meth:`prompt_positions`).

        Returns:
            embeds (B, P, D), valid (B, P) and position kinds (B, P) (:data:`TEXT` / :data:`IMAGE` /
            :data:`AUDIO`) [, positions (3, B, P) or None when the decoder has 1-D RoPE].
        """
        if isinstance(questions, str):
            questions = [questions]
        B = len(questions)
        images = list(images) if images is not None else [None] * B
        audios = list(audios) if audios is not None else [None] * B
        if len(images) != B or len(audios) != B:
            raise ValueError(f"{B} questions but {len(images)} images and {len(audios)} audio entries")
        img_idx = [i for i, im in enumerate(images) if im is not None]
        aud_idx = [i for i, a in enumerate(audios) if a is not None]
        img_tok = self.image_tokens([images[i] for i in img_idx]) if img_idx else []
        aud_tok = self.encode_audio([audios[i] for i in aud_idx]) if aud_idx else []
        per_img = [[img_tok[img_idx.index(b)]] if b in img_idx else [] for b in range(B)]
        per_aud = [[aud_tok[aud_idx.index(b)]] if b in aud_idx else [] for b in range(B)]
        for b, q in enumerate(questions):
            if not q.strip() and not per_aud[b]:
                raise ValueError(f"sample {b}: {NO_QUESTION}")
        prompts = [self.format_prompt(q, n_images=len(per_img[b]), n_audio=len(per_aud[b]))
                   for b, q in enumerate(questions)]
        embeds, valid, kinds = self.embed_prompt(prompts, images=per_img, audios=per_aud, return_kinds=True)
        if not return_positions:
            return embeds, valid, kinds
        if self.cfg.decoder.mrope_section is None:
            return embeds, valid, kinds, None
        grids = self.vision.token_grids([images[i] for i in img_idx]) if img_idx else []
        per_grid = [[grids[img_idx.index(b)]] if b in img_idx else [] for b in range(B)]
        return embeds, valid, kinds, self.prompt_positions(kinds, valid, per_grid)

    @staticmethod
    def prompt_positions(kinds: torch.Tensor, valid: torch.Tensor,
                         grids: Sequence[Sequence[tuple[int, int, int]]]) -> torch.Tensor:
        """M-RoPE positions (3, B, P) of embedded prompts (:func:`~mmdiff.decoder.multimodal_positions`):
        each run of :data:`IMAGE` positions is placed by its image's token grid, everything else as
        text; left padding gets position 0 (it is masked).

        Args:
            kinds: (B, P) what fills each position (:meth:`embed_prompt`).
            valid: (B, P) bool, False at left padding.
            grids: per sample, the (t, h, w) token grid of each of its images, in prompt order.
        """
        B, P = kinds.shape
        out = torch.zeros(3, B, P, dtype=torch.long)
        for b in range(B):
            row = kinds[b][valid[b]].tolist()
            spans: list = []
            queue, i = list(grids[b]), 0
            while i < len(row):
                if row[i] == IMAGE:
                    if not queue:
                        raise ValueError(f"prompt {b} has more image tokens than image grids")
                    grid = tuple(int(g) for g in queue.pop(0))
                    spans.append(grid)
                    i += grid[0] * grid[1] * grid[2]
                else:
                    n = next((j for j in range(i, len(row)) if row[j] == IMAGE), len(row)) - i
                    spans.append(n)
                    i += n
            if queue or i != len(row):
                raise ValueError(f"prompt {b}: its image tokens do not match its image grids {list(grids[b])}")
            out[:, b, P - len(row):] = multimodal_positions(spans)
        return out.to(kinds.device)

    def _results(self, out: SampleOutput, latency: float) -> list[GenerationResult]:
        return [GenerationResult(self.decode(t.tolist()), t.tolist(), out.nfe, latency, f.tolist())
                for t, f in zip(out.tokens, out.fixed_at)]

    def denoiser(self, embeds: torch.Tensor, valid: torch.Tensor, *, kinds: torch.Tensor | None, decode: DecodeConfig,
                 sampler: SamplerConfig | None = None, counter: FlopCounter | None = None,
                 positions: torch.Tensor | None = None) -> Denoiser:
        """The denoiser of ``decode.cache`` on prepared prompt embeddings, with ``decode.pruning``'s
        token pruning / layer skipping planned over ``sampler``'s steps (default ``decode.sampler``).

        Args:
            embeds: (B, P, D) prompt embeddings; valid: (B, P) bool.
            kinds: (B, P) what fills each prompt position (:data:`IMAGE` positions are what token
                pruning drops); None when the prompt has no media.
            decode: cache and pruning settings.
            sampler: the sampler settings the denoiser serves (a search resumes with others).
            counter: accumulates the decoder FLOPs.
            positions: (3, B, P) M-RoPE prompt positions (``prepare(..., return_positions=True)``);
                required when an M-RoPE decoder (Dimple) reads image tokens.
        """
        if (positions is None and self.cfg.decoder.mrope_section is not None and kinds is not None
                and bool((kinds == IMAGE).any())):
            raise ValueError("this model places image tokens by M-RoPE grid positions: pass positions "
                             "(model.prepare(..., return_positions=True))")
        pruning, sampler = decode.pruning, sampler or decode.sampler
        planner = None
        if pruning.active:
            if kinds is None and pruning.prunes:
                raise ValueError(f"token pruning ({pruning.prune}) needs kinds, the image token positions")
            media = kinds == IMAGE if kinds is not None else torch.zeros_like(valid)
            planner = LayerPlanner(pruning, prompt_embeds=embeds, media=media, n_layers=self.cfg.decoder.n_layers,
                                   total_steps=sampler.steps or sampler.gen_length)
        return build_denoiser(decode.cache, self.decoder, embeds, valid, attn_mode=self.cfg.decoder.attn_mode,
                              planner=planner, counter=counter, positions=positions)

    def sample(self, embeds: torch.Tensor, valid: torch.Tensor, *, kinds: torch.Tensor | None = None,
               decode: DecodeConfig | None = None, strategies: Sequence[Strategy] = (),
               callback: Callable[[StepEvent], None] | None = None, counter: FlopCounter | None = None,
               positions: torch.Tensor | None = None) -> SampleOutput:
        """Run the one sampler on prepared prompt embeddings (see :meth:`denoiser`)."""
        decode = decode or DecodeConfig()
        denoiser = self.denoiser(embeds, valid, kinds=kinds, decode=decode, counter=counter, positions=positions)
        return sample(denoiser, batch_size=embeds.shape[0], config=decode.sampler, mask_id=self.special.mask,
                      suppress_ids=(self.special.eos, self.special.pad), strategies=strategies,
                      callback=callback, device=embeds.device)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, fp16_parts: Sequence[str] = ()) -> None:
        """Write ``config.json``, ``model.safetensors``, ``tokenizer.json`` and, when the audio
        adapter has a CTC language model, ``ctc_lm.json`` into ``directory``.

        Every weight is in ``model.safetensors``, so the audio encoder's ``checkpoint`` (the Whisper
        directory it was initialised from) and the vision encoder's ``weights`` (e.g. the pretrained
        EfficientNet-Lite0 file) are written as null: loading never needs them.

        Args:
            directory: output folder (created).
            fp16_parts: parts (:data:`PARTS`) stored in float16 (rounded in this model too), e.g. a
                released float16 Whisper encoder kept frozen (exact).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.cfg.to_dict()
        if config.get("audio"):
            config["audio"]["checkpoint"] = None
        if config.get("vision"):
            config["vision"]["weights"] = None
        write_json(directory / CONFIG_NAME, config)
        halves = [getattr(self, p) for p in fp16_parts if getattr(self, p) is not None]
        dtypes = [next(m.parameters()).dtype for m in halves]
        for m in halves:
            m.half()
        try:
            save_weights(self, directory / WEIGHTS_NAME)
        finally:
            for m, dtype in zip(halves, dtypes):
                m.to(dtype)
        save_tokenizer(self.tokenizer, directory)
        if getattr(self.audio_adapter, "lm", None) is not None:
            self.audio_adapter.lm.save(directory / LM_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "MultimodalDiffusionLM":
        """Load a directory written by :meth:`save_pretrained`; errors name the missing/bad part."""

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        cfg = ModelConfig.from_dict(read_json(directory / CONFIG_NAME), source=str(directory / CONFIG_NAME))
        model = cls(cfg, load_tokenizer(directory))
        load_state_checked(model, load_safetensors(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
        lm_path = directory / LM_NAME
        if lm_path.is_file() and hasattr(model.audio_adapter, "lm"):
            model.audio_adapter.lm = TokenNGram.load(lm_path)
            if model.audio_adapter.lm.vocab_size != cfg.decoder.vocab_size:
                raise ValueError(f"{lm_path}: LM vocabulary {model.audio_adapter.lm.vocab_size} != the model's "
                                 f"{cfg.decoder.vocab_size} (it belongs to another model)")
        model.eval()
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
