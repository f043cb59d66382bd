"""The one masked-diffusion sampling loop.

Reverse process of masked diffusion (LLaDA, Nie et al. 2025, Alg. 4/5; MDLM, Sahoo et al. 2024):
start from a canvas of ``[MASK]`` tokens after the prompt; at each step predict every masked token
at once, keep the predictions the transfer rule selects and leave the rest masked. Semi-
autoregressive blocks (``block_length``) run this block by block, left to right.

Everything that varies between methods is a small object plugged into this loop:

* the :class:`Denoiser` computes logits for the canvas (plain recompute, or a cache strategy),
* the schedule, remasking score and transfer rule choose what to fix (``schedules.py``, ``rules.py``),
* :class:`Strategy` hooks adjust the initial canvas (structure priors) or the logits (EOS
  suppression, constrained slots) and observe each step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..io import JsonConfig
from ..options import check_settings, setting
from .rules import REMASKING, TRANSFER
from .schedules import SCHEDULES, num_transfer


@dataclass(frozen=True)
class SamplerConfig(JsonConfig):
    """Every knob of the sampler. Saved with evaluation results so a run is reproducible; each field
    carries its help, choices and range (:func:`~mmdiff.options.setting`), checked on construction."""

    gen_length: int = setting(16, "response canvas length in tokens", low=1, widget_max=256)
    steps: int | None = setting(None, "denoising steps over all blocks (default: gen_length, one token per step)",
                                low=1, widget_max=256)
    block_length: int | None = setting(None, "semi-autoregressive block length; must divide gen_length "
                                             "(default: gen_length, one block)", low=1, widget_max=256)
    schedule: str = setting("linear", "noise schedule", choices=SCHEDULES.names)
    shift: float = setting(3.0, "s of the shifted schedule", low=0.0, low_open=True, widget_max=10.0)
    remasking: str = setting("low_confidence", "confidence score deciding what stays masked", choices=REMASKING.names,
                             noun="remasking rule")
    transfer: str = setting("schedule", "how many tokens to fix per step (threshold = Dimple's confident decoding, "
                                        "factor = Fast-dLLM)", choices=TRANSFER.names, noun="transfer rule")
    threshold: float = setting(0.9, "confidence threshold of --transfer threshold", low=0.0, high=1.0, low_open=True)
    factor: float = setting(1.0, "f of --transfer factor", low=0.0, low_open=True, widget_max=4.0)
    temperature: float = setting(0.0, "0 = greedy; > 0 = Gumbel-max sampling", low=0.0, widget_max=2.0)
    suppress_eos: bool = setting(False, "forbid EOS so the answer fills the canvas (exact length)")
    seed: int = setting(0, "random seed for sampling (Gumbel noise, random remasking)")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.block_length is not None and self.gen_length % self.block_length:
            raise ValueError(f"block_length {self.block_length} does not divide gen_length {self.gen_length}: the "
                             f"last block would be shorter and get fewer steps; use a divisor of {self.gen_length}")

    @property
    def n_blocks(self) -> int:
        """Number of semi-autoregressive blocks."""
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def steps_per_block(self) -> int:
        """Denoising steps planned per block (at least one)."""
        return max(1, (self.steps or self.gen_length) // self.n_blocks)


@dataclass
class StepState:
    """What the loop knows at a step; passed to the denoiser and to strategy hooks."""

    canvas: torch.Tensor  # (B, L) current response tokens, mask id where undecided
    step: int  # global step index (= NFE so far)
    block: int  # block index
    block_slice: slice  # canvas positions of the current block
    mask_id: int


@dataclass
class StepEvent:
    """One denoising step, as seen by a callback (the demo animates these)."""

    step: int
    block: int
    canvas: torch.Tensor  # (B, L) after this step
    fixed: torch.Tensor  # (B, L) bool: positions fixed at this step


@dataclass
class SampleOutput:
    """Result of :func:`sample`."""

    tokens: torch.Tensor  # (B, L) final response canvas
    nfe: int  # forward evaluations of the denoiser
    fixed_per_step: list[int] = field(default_factory=list)  # tokens fixed at each step (whole batch)
    fixed_at: torch.Tensor | None = None  # (B, L) step that fixed each position; -1 = preset
    wall_time: float = 0.0  # seconds


class Denoiser(Protocol):
    """Anything that maps the current canvas to per-position logits (B, L, V), aligned so that
    position i's logits predict canvas token i."""

    def logits(self, state: StepState) -> torch.Tensor: ...


class Strategy:
    """Hook points of the loop; subclasses override what they need (all default to no-ops)."""

    def init_canvas(self, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
        """Return the canvas before step 0 (e.g. a structure prior's fixed tokens)."""
        return canvas

    def process_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:
        """Adjust logits before prediction (e.g. forbid tokens)."""
        return logits

    def on_step(self, event: StepEvent) -> None:
        """Observe a finished step."""


class SuppressTokens(Strategy):
    """Forbid some token ids everywhere (EOS/PAD suppression for exact-length answers)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = sorted(set(token_ids))

    def process_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.token_ids] = float("-inf")
        return logits


def predict(logits: torch.Tensor, *, temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x0 ~ softmax(logits / T) and return (x0, probs).

    Greedy for T = 0. For T > 0 uses the Gumbel-max trick, argmax(logits/T + G) with
    G = -log(-log U), computed in float64: in float32 the Gumbel noise is too coarse and rare tokens
    are over-sampled (the reason LLaDA's ``add_gumbel_noise`` runs in float64).

    Args:
        logits: (B, L, V).

    Returns:
        x0 (B, L) long and probs (B, L, V) float32 of softmax(logits) (temperature-free confidence).
    """
    probs = logits.float().softmax(-1)
    if temperature <= 0:
        return logits.argmax(-1), probs
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    g = -torch.log(-torch.log(u.clamp(min=1e-300)))
    return (logits.double() / temperature + g).argmax(-1), probs


def _blocks(length: int, block_length: int) -> list[slice]:
    return [slice(s, min(s + block_length, length)) for s in range(0, length, block_length)]


class SamplerRun:
    """The one loop's progress on one batch: canvas, block, step, transfer budget, RNG and hooks.

    The loop is ``while not run.done: run.advance(denoiser.logits(run.state))``: :func:`iter_sample`
    runs one; the serving engine (:mod:`mmdiff.serving.engine`) runs many side by side and fills
    their logits from one batched decoder forward per step. Each run keeps its own settings, so
    requests with different canvases, thresholds and block layouts advance together.

    Args:
        batch_size: B.
        config: sampler settings.
        mask_id: the ``[MASK]`` token id.
        suppress_ids: token ids forbidden when ``config.suppress_eos`` (EOS, PAD).
        strategies: extra hooks, applied in order.
        device: where the canvas lives.
    """

    def __init__(self, *, batch_size: int, config: SamplerConfig, mask_id: int, suppress_ids: Sequence[int] = (),
                 strategies: Sequence[Strategy] = (), device: str | torch.device = "cpu") -> None:
        cfg = self.config = config
        L = cfg.gen_length
        self.mask_id, self.device = mask_id, device
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.hooks = list(strategies) + ([SuppressTokens(suppress_ids)] if cfg.suppress_eos and suppress_ids else [])
        canvas = torch.full((batch_size, L), mask_id, dtype=torch.long, device=device)
        for h in self.hooks:
            canvas = h.init_canvas(canvas, mask_id)
        self.canvas = canvas  # (B, L)
        self.fixed_at = torch.where(canvas == mask_id, 0, -1)  # (B, L)
        self.blocks = _blocks(L, cfg.block_length or L)
        self.score_fn, self.rule = REMASKING.get(cfg.remasking), TRANSFER.get(cfg.transfer)
        self.nfe, self.fixed_per_step, self.t0 = 0, [], time.perf_counter()
        self.block, self.s, self.budget = -1, 0, None
        self._next_block()

    def _next_block(self) -> None:
        """Move to the next block that still holds masks (skipping filled ones without a forward pass)
        and plan its transfer budget; past the last block the run is done."""
        while True:
            self.block += 1
            if self.block >= len(self.blocks):
                return
            blk = self.blocks[self.block]
            if (self.canvas[:, blk] == self.mask_id).any():
                break
        self.s = 0
        self.in_block = torch.zeros(self.config.gen_length, dtype=torch.bool, device=self.device)  # (L,)
        self.in_block[blk] = True
        self.budget = num_transfer((self.canvas[:, blk] == self.mask_id).sum(-1).cpu(), self.config.steps_per_block,
                                   schedule=self.config.schedule, shift=self.config.shift).to(self.device)  # (B, S)

    @property
    def done(self) -> bool:
        return self.block >= len(self.blocks)

    @property
    def state(self) -> StepState:
        """What the denoiser (and the hooks) see at the next step."""
        return StepState(self.canvas, self.nfe, self.block, self.blocks[self.block], self.mask_id)

    def advance(self, logits: torch.Tensor) -> StepEvent:
        """One denoising step from the denoiser's ``logits`` (B, L, V) for :attr:`state`."""
        cfg, state = self.config, self.state
        active = (self.canvas == self.mask_id) & self.in_block  # (B, L)
        self.nfe += 1
        for h in self.hooks:
            logits = h.process_logits(logits, state)
        x0, probs = predict(logits, temperature=cfg.temperature, generator=self.generator)
        conf = probs.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)
        score = self.score_fn(probs, x0, self.generator).float()
        score = torch.where(active, score, torch.full_like(score, float("-inf")))
        remaining = active.sum(-1)
        k = self.budget[:, self.s] if self.s < cfg.steps_per_block - 1 else remaining  # last step: fix the rest
        k = torch.minimum(k.clamp(min=1), remaining)
        pick = self.rule(score, conf, k, threshold=cfg.threshold, factor=cfg.factor) & active
        self.canvas = torch.where(pick, x0, self.canvas)
        self.fixed_at = torch.where(pick, self.nfe, self.fixed_at)
        self.fixed_per_step.append(int(pick.sum()))
        event = StepEvent(self.nfe, self.block, self.canvas, pick)
        for h in self.hooks:
            h.on_step(event)
        self.s += 1
        if not ((self.canvas == self.mask_id) & self.in_block).any():
            self._next_block()  # block (or whole canvas) filled: early stop
        return event

    def output(self) -> SampleOutput:
        return SampleOutput(self.canvas, self.nfe, self.fixed_per_step, self.fixed_at, time.perf_counter() - self.t0)


def iter_sample(denoiser: Denoiser, *, batch_size: int, config: SamplerConfig, mask_id: int,
                suppress_ids: Sequence[int] = (), strategies: Sequence[Strategy] = (),
                device: str | torch.device = "cpu") -> Iterator[StepEvent | SampleOutput]:
    """The denoising loop as a generator: yields a :class:`StepEvent` per step, then the
    :class:`SampleOutput`. :func:`sample` is the plain-call wrapper.

    Args:
        denoiser: computes canvas logits (holds the prompt and any cache).
        batch_size: B.
        config: sampler settings.
        mask_id: the ``[MASK]`` token id.
        suppress_ids: token ids forbidden when ``config.suppress_eos`` (EOS, PAD).
        strategies: extra hooks, applied in order.
    """
    run = SamplerRun(batch_size=batch_size, config=config, mask_id=mask_id, suppress_ids=suppress_ids,
                     strategies=strategies, device=device)
    while not run.done:
        yield run.advance(denoiser.logits(run.state))
    yield run.output()


def sample(denoiser: Denoiser, *, batch_size: int, config: SamplerConfig, mask_id: int,
           suppress_ids: Sequence[int] = (), strategies: Sequence[Strategy] = (),
           callback: Callable[[StepEvent], None] | None = None,
           device: str | torch.device = "cpu") -> SampleOutput:
    """Run :func:`iter_sample` to the end; ``callback`` sees every :class:`StepEvent`."""
    out = None
    for item in iter_sample(denoiser, batch_size=batch_size, config=config, mask_id=mask_id,
                            suppress_ids=suppress_ids, strategies=strategies, device=device):
        if isinstance(item, SampleOutput):
            out = item
        elif callback is not None:
            callback(item)
    assert out is not None
    return out
