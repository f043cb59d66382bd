"""Self-verifying test-time search over the one sampler (dMLLM-TTS, 2025).

dMLLM-TTS ("Test-time scaling of diffusion multimodal LLMs", Dec 2025) replaces linear best-of-N,
which costs O(N * T) forward passes for N trajectories refined T times, by a hierarchical search
costing O(N + T), with the model verifying its own candidates. Here, for understanding tasks (VQA,
captions), everything is a layer *above* :func:`~mmdiff.sampling.iter_sample`: candidates are
batches of the one sampler loop; partial canvases are continued and refined through
:class:`~mmdiff.sampling.Strategy` hooks (:class:`PresetCanvas`, :class:`ConfidenceTrace`).

* **exploration**: candidate 0 is the plain decode (the caller's :class:`SamplerConfig`); the other
  N - 1 are sampled at ``SearchConfig.temperature`` with the remasking orders of
  ``SearchConfig.remasking`` in turn, one batched sampler call per order (each row of a batch draws
  its own Gumbel noise);
* **verifiers** (:data:`VERIFIERS`, no external model): ``elbo``, the per-token masked-diffusion
  ELBO of the candidate (:func:`elbo_score`), ``yesno``, the model's P("yes") to
  "<question> answer: <candidate>. is that right?" (:func:`yes_probability`, the ``verify``
  question family the model is trained on), and ``elbo_yesno``, the sum of the answer's
  log-likelihood bound and log P(yes) (:func:`elbo_yes_score`);
* **search strategies** (:data:`SEARCHES`): ``none`` (plain decoding), ``best_of_n`` (N full
  samples, each scored: the linear baseline) and ``hierarchical``: the N trajectories run to each
  checkpoint of ``SearchConfig.checkpoints`` and the best ``keep`` fraction goes on (successive
  halving); a partial canvas is scored with its masks filled by the model's current prediction
  (free: the logits of the step just taken; the content of a short answer is often the last thing
  decided); the survivors are finished and scored; the best one is refined for T rounds (remask
  its least confident tokens, denoise them again, keep the better-scoring version).

NFE (the cost unit, comparable between strategies and with ``GenerationResult.nfe``): one NFE is
one decoder forward pass over one sequence (prompt + canvas). A forward over a batch of B
sequences counts B. Counted exactly: every sampler step (B per step of a B-row batch), the prompt
pass of the prefix cache (B per sampler call, ``cache="prefix"`` only; the denoiser's decoder calls
are counted by its :class:`~mmdiff.flops.FlopCounter`), the ELBO passes
(``elbo_samples`` per scored canvas) and the yes/no passes (1 per scored canvas; both for
``elbo_yesno``); identical canvases (frequent for short answers) are scored once. The vision
and audio encoders run once per question and are not counted. Plain decoding thus costs
``steps`` NFE; best-of-N about N * (steps + V), V the verifier's passes per candidate; the
hierarchical search about N * (s1 + V) + M * (steps - s1 + V) + T * (r * steps + V) with one
checkpoint at step s1, M = keep * N survivors and refinement ratio r: linear in N + T, since only
the best finished candidate is refined.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .flops import FlopCounter
from .losses import diffusion_loss
from .registry import Registry
from .sampling import (
    DecodeConfig,
    SampleOutput,
    SamplerConfig,
    SearchConfig,
    StepEvent,
    StepState,
    Strategy,
    iter_sample,
)
from .tasks.prompts import NO, YES, verification_question

if TYPE_CHECKING:
    from .model import GenerationResult, MultimodalDiffusionLM

VERIFY_CANVAS = 8  # response canvas of a yes/no verification pass: the recipe's short-answer canvas


# ------------------------------------------------------------------------------------------------
# result (the settings are :class:`~mmdiff.sampling.SearchConfig`, part of the DecodeConfig)
# ------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The chosen answer, its cost and the candidates it was chosen from."""

    text: str
    nfe: int  # decoder forwards of single sequences, see the module docstring
    latency_s: float
    candidates: list[tuple[str, float | None]]  # (text, score) of every finished, scored candidate, best first
    tokens: list[int] = field(default_factory=list)  # response canvas of the chosen answer


# ------------------------------------------------------------------------------------------------
# strategies of the one sampler used by the search
# ------------------------------------------------------------------------------------------------
class PresetCanvas(Strategy):
    """Start the sampler from a given canvas (a partial canvas to continue, or a candidate with some
    tokens remasked to refine): its non-mask tokens are kept, its masks are denoised."""

    def __init__(self, canvas: torch.Tensor) -> None:
        self.canvas = canvas  # (B, L)

    def init_canvas(self, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
        if canvas.shape != self.canvas.shape:
            raise ValueError(f"preset canvas has shape {tuple(self.canvas.shape)}, "
                             f"the sampler's is {tuple(canvas.shape)}")
        return self.canvas.to(canvas.device)


class ConfidenceTrace(Strategy):
    """Records, at no extra forward pass, each token's confidence p(x_i | canvas) at the step that
    fixed it (0 while masked), and the look-ahead canvas: the decided tokens with every masked
    position filled by the model's current prediction argmax p(x_i | canvas) (the x0 estimate).

    Both come from the logits this hook sees (after the strategies listed before it, before the
    sampler's EOS suppression).

    Args:
        confidence: (B, L) confidences of preset tokens, carried over (zeros by default).
    """

    def __init__(self, confidence: torch.Tensor | None = None) -> None:
        self.confidence = confidence
        self.lookahead: torch.Tensor | None = None  # (B, L)
        self._logits: torch.Tensor | None = None
        self._mask_id: int | None = None

    def init_canvas(self, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
        if self.confidence is None:
            self.confidence = torch.zeros(canvas.shape, device=canvas.device)
        self.confidence = torch.where(canvas == mask_id, 0.0, self.confidence.to(canvas.device).float())
        self.lookahead, self._mask_id = canvas.clone(), mask_id
        return canvas

    def process_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:
        self._logits = logits
        return logits

    def on_step(self, event: StepEvent) -> None:
        probs = self._logits.float().softmax(-1)  # (B, L, V)
        p = probs.gather(-1, event.canvas[..., None]).squeeze(-1)  # (B, L)
        self.confidence = torch.where(event.fixed, p, self.confidence)
        self.lookahead = torch.where(event.canvas == self._mask_id, probs.argmax(-1), event.canvas)


def remask_least_confident(canvas: torch.Tensor, confidence: torch.Tensor, n: int, mask_id: int) -> torch.Tensor:
    """Mask the ``n`` least confident positions of each row (ties: the earlier position first).

    Args:
        canvas: (B, L) finished canvases.
        confidence: (B, L) per-token confidences.
    """
    order = confidence.argsort(dim=-1, stable=True)[:, :n]  # (B, n)
    return canvas.scatter(-1, order, mask_id)


# ------------------------------------------------------------------------------------------------
# schedule arithmetic: checkpoints and resuming, in the sampler's own terms
# ------------------------------------------------------------------------------------------------
def checkpoint_step(config: SamplerConfig, fraction: float) -> int | None:
    """The sampler step at which partial canvases are scored, or None when there is none.

    One block: ``round(fraction * steps)`` within [1, steps - 1]. Several blocks: the block boundary
    nearest to ``fraction`` (not the last), so that resuming keeps the schedule of each block.
    """
    n_blocks, per_block = config.n_blocks, config.steps_per_block
    if n_blocks == 1:
        return min(max(round(fraction * per_block), 1), per_block - 1) if per_block > 1 else None
    return per_block * min(max(round(fraction * n_blocks), 1), n_blocks - 1)


def resume_config(config: SamplerConfig, steps_done: int) -> SamplerConfig:
    """The sampler settings that continue a canvas after ``steps_done`` steps of ``config``.

    One block: the remaining steps over the remaining masks (the same transfer counts as the
    uninterrupted run for the linear schedule). Several blocks: unchanged, since checkpoints sit on
    block boundaries and the sampler skips filled blocks without a forward pass.
    """
    n_blocks, per_block = config.n_blocks, config.steps_per_block
    if n_blocks > 1 or steps_done == 0:
        return config
    return replace(config, steps=max(1, per_block - steps_done))


def exploration_configs(config: SamplerConfig, search: SearchConfig) -> list[tuple[SamplerConfig, int]]:
    """(sampler settings, rows) of each exploration batch: the plain decode (one row), then the
    other N - 1 trajectories split over ``search.remasking``, sampled at ``search.temperature``
    with seed ``search.seed + g`` for the g-th order."""
    groups = [(config, 1)]
    rest, orders = search.candidates - 1, search.remasking
    for g, rule in enumerate(orders):
        rows = rest // len(orders) + (g < rest % len(orders))
        if rows:
            groups.append((replace(config, temperature=search.temperature, remasking=rule, seed=search.seed + g), rows))
    return groups


# ------------------------------------------------------------------------------------------------
# one search: the prompt, the verifier and the NFE count
# ------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One trajectory: the batch it belongs to and its canvas so far."""

    group: int  # index in exploration_configs (-1: a refinement)
    tokens: torch.Tensor  # (L,) canvas, mask id where still undecided
    confidence: torch.Tensor  # (L,) p(token) when it was fixed, 0 where masked
    lookahead: torch.Tensor  # (L,) tokens with masks filled by the model's current prediction
    steps_done: int = 0  # sampler steps taken from the empty canvas (refinements: of the refinement)
    score: float | None = None


class SearchRun:
    """A question's prompt embedded once, the sampler and the verifier run on it, and the NFE count.

    Args:
        model: the multimodal model.
        question: the question text (may be "" with audio).
        media: (image tokens, audio tokens) each a list of (N, D) tensors (zero or one each).
        decode: the caller's decode settings: ``decode.sampler`` is the plain decode's, ``decode.cache``
            and ``decode.pruning`` apply to every trajectory (the denoiser of ``model.generate``),
            ``decode.search`` is the search's.
    """

    def __init__(self, model: MultimodalDiffusionLM, question: str, media: tuple[list, list], *,
                 decode: DecodeConfig) -> None:
        self.model, self.question, self.decode = model, question, decode
        self.config, self.search = decode.sampler, decode.search
        self.images, self.audios = media
        if self.images and model.cfg.decoder.mrope_section is not None:
            raise ValueError("a test-time search on an image is not supported for M-RoPE models (Dimple) yet: "
                             "decode plainly (no --search)")
        prompt = model.format_prompt(question, n_images=len(self.images), n_audio=len(self.audios))
        self.embeds, self.valid, self.kinds = model.embed_prompt([prompt], images=[self.images], audios=[self.audios],
                                                                 return_kinds=True)  # (1, P, D), (1, P), (1, P)
        self.mask_id = model.special.mask
        self.nfe = 0

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeds.expand(n, -1, -1), self.valid.expand(n, -1)  # (n, P, D), (n, P)

    def _kinds(self, n: int) -> torch.Tensor:
        return self.kinds.expand(n, -1)  # (n, P)

    def denoise(self, config: SamplerConfig, n: int, *, group: int = -1, canvas: torch.Tensor | None = None,
                confidence: torch.Tensor | None = None, steps_done: int = 0, stop_after: int | None = None
                ) -> list[Candidate]:
        """Run the one sampler on ``n`` copies of the prompt.

        Args:
            config: sampler settings of this batch.
            n: rows.
            group: exploration batch the rows belong to (-1: a refinement).
            canvas: (n, L) preset canvases (:class:`PresetCanvas`), or None for all-mask canvases.
            confidence: (n, L) confidences of the preset tokens.
            steps_done: steps the preset canvases already took.
            stop_after: stop after this many steps (a checkpoint); None runs to the end.
        """
        embeds, valid = self._rows(n)
        counter = FlopCounter(self.model.cfg.decoder)  # counts the denoiser's decoder calls (prompt passes too)
        denoiser = self.model.denoiser(embeds, valid, kinds=self._kinds(n), decode=self.decode, sampler=config,
                                       counter=counter)
        trace = ConfidenceTrace(confidence)
        hooks = ([PresetCanvas(canvas)] if canvas is not None else []) + [trace]
        steps, out = 0, canvas
        for item in iter_sample(denoiser, batch_size=n, config=config, mask_id=self.mask_id,
                                suppress_ids=(self.model.special.eos, self.model.special.pad), strategies=hooks,
                                device=self.embeds.device):
            if isinstance(item, SampleOutput):
                out = item.tokens
                break
            steps, out = steps + 1, item.canvas
            if stop_after is not None and steps >= stop_after:
                break
        self.nfe += counter.forwards * n
        return [Candidate(group, out[i], trace.confidence[i], trace.lookahead[i], steps_done + steps) for i in range(n)]

    def forward(self, response: torch.Tensor) -> torch.Tensor:
        """Aligned response logits (R, L, V) of R response rows after the prompt; counts R NFE."""
        embeds, valid = self._rows(response.shape[0])
        self.nfe += response.shape[0]
        return self.model(embeds, valid, response)

    def verify(self, canvas: torch.Tensor) -> list[float]:
        """Scores of (B, L) canvases (partial ones too) by ``search.verifier``: higher is better."""
        with torch.no_grad():
            return VERIFIERS.get(self.search.verifier)(self, canvas).tolist()

    def decode_text(self, tokens: torch.Tensor) -> str:
        return self.model.decode(tokens.tolist())

    # -- batched steps of the search over candidate lists -----------------------------------------
    def explore(self, groups: list[tuple[SamplerConfig, int]], *, stop_after: int | None) -> list[Candidate]:
        """Start every exploration batch; ``stop_after`` steps, or to the end."""
        return [c for g, (cfg, rows) in enumerate(groups)
                for c in self.denoise(cfg, rows, group=g, stop_after=stop_after)]

    def advance(self, cands: list[Candidate], groups: list[tuple[SamplerConfig, int]], *,
                until: int | None) -> list[Candidate]:
        """Continue unfinished candidates to step ``until`` (None: to the end), batched per
        (exploration batch, steps done); finished candidates are returned as they are."""
        by_key: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(cands):
            if (c.tokens == self.mask_id).any():
                by_key.setdefault((c.group, c.steps_done), []).append(i)
        out = list(cands)
        for (g, done), idx in by_key.items():
            new = self.denoise(resume_config(groups[g][0], done), len(idx), group=g,
                               canvas=torch.stack([cands[i].tokens for i in idx]),
                               confidence=torch.stack([cands[i].confidence for i in idx]), steps_done=done,
                               stop_after=None if until is None else until - done)
            for i, c in zip(idx, new):
                out[i] = c
        return out

    def score(self, cands: list[Candidate]) -> list[Candidate]:
        """Score the candidates in one verifier batch: each one's look-ahead canvas with
        ``search.lookahead`` (the same as its tokens once finished), else its decided tokens.
        Identical canvases are scored once (the verifiers are deterministic)."""
        canvas = torch.stack([c.lookahead if self.search.lookahead else c.tokens for c in cands])  # (B, L)
        distinct, index = canvas.unique(dim=0, return_inverse=True)  # (U, L), (B,)
        scores = self.verify(distinct)
        return [replace(c, score=scores[i]) for c, i in zip(cands, index.tolist())]

    def refine(self, cands: list[Candidate], round_: int) -> list[Candidate]:
        """One refinement round: remask each candidate's least confident tokens, denoise them again
        (one batch, one block, at ``search.temperature``), score, keep whichever version scores higher."""
        L = self.config.gen_length
        n = max(1, round(self.search.refine_ratio * L))
        n_blocks, per_block = self.config.n_blocks, self.config.steps_per_block
        cfg = replace(self.config, block_length=None, steps=max(1, math.ceil(n * n_blocks * per_block / L)),
                      temperature=self.search.temperature, seed=self.search.seed + 1 + round_)
        canvas = remask_least_confident(torch.stack([c.tokens for c in cands]),
                                        torch.stack([c.confidence for c in cands]), n, self.mask_id)
        proposals = self.score(self.denoise(cfg, len(cands), canvas=canvas,
                                            confidence=torch.stack([c.confidence for c in cands])))
        return [p if p.score > c.score else c for c, p in zip(cands, proposals)]


def _keep_best(cands: list[Candidate], n: int) -> list[Candidate]:
    """The ``n`` best-scoring candidates, in their original order on ties (candidate 0 first)."""
    order = sorted(range(len(cands)), key=lambda i: -cands[i].score)[:n]
    return [cands[i] for i in sorted(order)]


# ------------------------------------------------------------------------------------------------
# verifiers: (run, canvases (B, L)) -> scores (B,), higher = better; count their own NFE
# ------------------------------------------------------------------------------------------------
VERIFIERS: Registry[Callable[[SearchRun, torch.Tensor], torch.Tensor]] = Registry("verifier")


def elbo_masks(canvas: torch.Tensor, mask_id: int, *, samples: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed, seeded masks of the ELBO estimate.

    A fixed number of masks per sample, weighted by n / m (LLaDA, Nie et al. 2025, Eq. 6), with the
    ratios stratified over the K samples and paired as complements (LaViDa's complementary masking):
    sample k < K/2 masks m_k = max(1, round((k + 1/2) / K * n)) of the n decided positions of a
    canvas, and sample K - 1 - k masks exactly the others, so each pair scores every decided token
    once (short answers have one content token among EOS fill: an unpaired estimate often never
    masks it). With K odd the middle sample masks half. The random order of positions comes from
    ``seed`` and is shared by all canvases (common random numbers: candidates are compared on the
    same masks).

    Args:
        canvas: (B, L) canvases; positions holding ``mask_id`` are undecided and never scored.

    Returns:
        masked (B, K, L) bool, t (B, K) mask ratios (masks / n, at least 1 / n), n (B,) decided positions.
    """
    B, L = canvas.shape
    K, half = samples, samples // 2
    decided = canvas != mask_id  # (B, L)
    n = decided.sum(-1).clamp(min=1)  # (B,)
    u = torch.rand(K, L, generator=torch.Generator().manual_seed(seed)).to(canvas.device)  # (K, L)
    ratio = (torch.arange(K, device=canvas.device) + 0.5) / K  # (K,)
    m = (ratio[None] * n[:, None]).round().clamp(min=1)  # (B, K)
    priority = torch.where(decided[:, None], u[None], torch.inf)  # (B, K, L)
    rank = priority.argsort(dim=-1, stable=True).argsort(dim=-1)  # (B, K, L)
    masked = (rank < m[..., None]) & decided[:, None]  # (B, K, L)
    masked[:, K - half:] = decided[:, None] & ~masked[:, :half].flip(1)  # sample K-1-k: complement of k
    return masked, masked.sum(-1).clamp(min=1) / n[:, None], n


@VERIFIERS.register("elbo")
def elbo_score(run: SearchRun, canvas: torch.Tensor) -> torch.Tensor:
    """Per-token masked-diffusion ELBO of each canvas given the prompt:
    log p(x) >= E_t[(1/t) sum_{i masked} log p(x_i | x_t)] (LLaDA Eq. 3), estimated with the K masks
    of :func:`elbo_masks` through the training loss (:func:`~mmdiff.training.losses.diffusion_loss`)
    and divided by the number of decided tokens, so partial canvases are comparable. K NFE per canvas.
    """
    B, L = canvas.shape
    K = run.search.elbo_samples
    masked, t, n = elbo_masks(canvas, run.mask_id, samples=K, seed=run.search.seed)
    targets = canvas[:, None].expand(B, K, L)  # (B, K, L)
    logits = run.forward(targets.masked_fill(masked, run.mask_id).reshape(B * K, L)).view(B, K, L, -1)
    # diffusion_loss averages over K * L entries; * L / n turns it into a mean over decided tokens
    return torch.stack([-diffusion_loss(logits[b], targets[b], masked[b], t[b]) * L / n[b] for b in range(B)])


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "yes" and "no" as the model writes them as answers; each must be one token."""
    ids = []
    for word in (YES, NO):
        tok = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise ValueError(f"the yesno verifier needs {word!r} to be a single token; the tokenizer gives {tok}")
        ids.append(int(tok[0]))
    return ids[0], ids[1]


@VERIFIERS.register("yesno")
def yes_probability(run: SearchRun, canvas: torch.Tensor) -> torch.Tensor:
    """P(yes) = softmax over {yes, no} of the first response position's logits for
    "<question> answer: <candidate>. is that right?" with the question's media (masks of a
    partial canvas are dropped from the candidate text). One NFE per canvas."""
    model, B = run.model, canvas.shape[0]
    yes, no = yes_no_ids(model.tokenizer)
    prompts = [model.format_prompt(verification_question(run.question, run.decode_text(row)), n_images=len(run.images),
                                   n_audio=len(run.audios)) for row in canvas]
    embeds, valid = model.embed_prompt(prompts, images=[run.images] * B, audios=[run.audios] * B)
    response = torch.full((B, VERIFY_CANVAS), run.mask_id, dtype=torch.long, device=embeds.device)
    run.nfe += B
    logits = model(embeds, valid, response)[:, 0]  # (B, V)
    return logits[:, [yes, no]].float().softmax(-1)[:, 0]


@VERIFIERS.register("elbo_yesno")
def elbo_yes_score(run: SearchRun, canvas: torch.Tensor) -> torch.Tensor:
    """Both signals as one posterior-style score, log p(answer | prompt) + log P(yes | prompt, answer):
    the ELBO summed over the decided tokens (the answer's likelihood, a prior) plus the log of the
    yes/no verifier's P(yes) (the model's judgement of the answer). K + 1 NFE per canvas."""
    decided = (canvas != run.mask_id).sum(-1).clamp(min=1)  # (B,)
    return elbo_score(run, canvas) * decided + yes_probability(run, canvas).clamp(min=1e-12).log()


# ------------------------------------------------------------------------------------------------
# search strategies: run -> (chosen candidate, scored finished candidates)
# ------------------------------------------------------------------------------------------------
SEARCHES: Registry[Callable[[SearchRun], tuple[Candidate, list[Candidate]]]] = Registry("search strategy")


@SEARCHES.register("none")
def plain(run: SearchRun) -> tuple[Candidate, list[Candidate]]:
    """Plain decoding: the sampler once with the caller's settings, nothing scored."""
    cand = run.explore([(run.config, 1)], stop_after=None)[0]
    return cand, [cand]


@SEARCHES.register("best_of_n")
def best_of_n(run: SearchRun) -> tuple[Candidate, list[Candidate]]:
    """Linear best-of-N: N full trajectories, each scored by the verifier, the best returned.
    With N = 1 nothing is scored (it is plain decoding)."""
    cands = run.explore(exploration_configs(run.config, run.search), stop_after=None)
    if len(cands) == 1:
        return cands[0], cands
    cands = run.score(cands)
    return _keep_best(cands, 1)[0], cands


@SEARCHES.register("hierarchical")
def hierarchical(run: SearchRun) -> tuple[Candidate, list[Candidate]]:
    """dMLLM-TTS's hierarchical search: start N trajectories; at each checkpoint score the partial
    canvases and keep the best ``keep`` fraction (successive halving); finish and score the
    survivors; refine the best of them for T rounds (one proposal per round, so the cost stays
    O(N + T)). A checkpoint that would prune nothing is skipped (no scoring, no interruption), so
    N = 1 with T = 0 is plain decoding."""
    search, groups = run.search, exploration_configs(run.config, run.search)
    cands: list[Candidate] | None = None
    for fraction in search.checkpoints:
        n = search.candidates if cands is None else len(cands)
        survivors = max(1, math.ceil(search.keep * n))
        step = checkpoint_step(run.config, fraction)
        if survivors >= n or step is None or (cands is not None and step <= max(c.steps_done for c in cands)):
            continue
        cands = run.explore(groups, stop_after=step) if cands is None else run.advance(cands, groups, until=step)
        cands = _keep_best(run.score(cands), survivors)
    cands = run.explore(groups, stop_after=None) if cands is None else run.advance(cands, groups, until=None)
    if len(cands) == 1 and search.refine == 0:
        return cands[0], cands
    finished = run.score(cands)
    best = [_keep_best(finished, 1)[0]]
    for r in range(search.refine):
        refined = run.refine(best, r)
        if refined[0] is not best[0]:
            finished.append(refined[0])
        best = refined
    return best[0], finished


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def search(model: MultimodalDiffusionLM, question: str, *, image: Any = None, audio: Any = None,
           decode: DecodeConfig | None = None) -> SearchResult:
    """Answer one question with a self-verifying test-time search (dMLLM-TTS) over the one sampler.

    Args:
        model: the multimodal model.
        question: the question (may be "" when ``audio`` holds a spoken question).
        image: an image (path / PIL) or None.
        audio: a clip (path / (array, rate)) or None.
        decode: ``decode.search`` is the search; ``decode.sampler`` the plain decode (and the base of
            every other trajectory); ``decode.cache`` and ``decode.pruning`` apply to every trajectory,
            through the same denoiser as :meth:`~mmdiff.model.MultimodalDiffusionLM.generate`. The
            default is plain decoding.

    Returns:
        The best-scoring answer, the NFE spent (see the module docstring), the latency, and every
        finished scored candidate as (text, score), best first, duplicates merged.
    """
    decode = decode or DecodeConfig()
    if not question.strip() and audio is None:
        raise ValueError("empty question and no audio")
    t0 = time.perf_counter()
    media = ([model.image_tokens([image])[0]] if image is not None else [],
             model.encode_audio([audio]) if audio is not None else [])
    run = SearchRun(model, question, media, decode=decode)
    best, finished = SEARCHES.get(decode.search.strategy)(run)
    texts: dict[str, float | None] = {}
    for c in finished:
        text = run.decode_text(c.tokens)
        if text not in texts or (c.score is not None and (texts[text] is None or c.score > texts[text])):
            texts[text] = c.score
    ranked = sorted(texts.items(), key=lambda kv: -math.inf if kv[1] is None else -kv[1])
    return SearchResult(run.decode_text(best.tokens), run.nfe, time.perf_counter() - t0, ranked, best.tokens.tolist())


def answer(model: MultimodalDiffusionLM, questions: Sequence[str], *, images: Sequence, audios: Sequence,
           decode: DecodeConfig, callback: Callable[[StepEvent], None] | None = None
           ) -> list[GenerationResult | SearchResult]:
    """Answer a batch the way ``decode`` says: one batched
    :meth:`~mmdiff.model.MultimodalDiffusionLM.generate` call for plain decoding, or one :func:`search`
    per question when ``decode.search`` is on. The inputs are checked first
    (:meth:`~mmdiff.model.MultimodalDiffusionLM.check_inputs`: valid text, an image for a model with a
    vision encoder), so every entry point refuses the same inputs with the same message.

    Args:
        model: the multimodal model.
        questions: text per sample.
        images: per sample an image or None.
        audios: per sample a clip or None.
        decode: the decode settings.
        callback: sees every denoising step of plain decoding (a search is not streamed).

    Raises:
        ValueError: an input refused by ``check_inputs`` or by the media layer, or a callback with a search.
    """
    questions = model.check_inputs(questions, images=images, audios=audios)
    if not decode.search.active:
        return model.generate(questions, images=list(images), audios=list(audios), decode=decode, callback=callback)
    if callback is not None:
        raise ValueError("a test-time search runs many sampler batches and is not streamed: no callback")
    return [search(model, q, image=im, audio=au, decode=decode) for q, im, au in zip(questions, images, audios)]


__all__ = ["ConfidenceTrace", "PresetCanvas", "SEARCHES", "SearchResult", "VERIFIERS", "answer", "checkpoint_step",
           "elbo_masks", "elbo_score", "elbo_yes_score", "exploration_configs", "remask_least_confident",
           "resume_config", "search", "yes_no_ids", "yes_probability"]
