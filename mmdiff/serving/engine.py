"""Step-level continuous batching: many requests advance through the one sampler loop together.

Each request is a :class:`~mmdiff.sampling.sampler.SamplerRun` (its own canvas, sampler settings,
block layout, RNG and progress) with its prompt encoded once. At every engine step the active
requests are grouped by canvas length and cache strategy, and each group's canvases go through
**one** batched decoder forward; every run then takes its own step from its rows of the logits
(its transfer rule, threshold and schedule). Requests join and leave between steps, the way
diffusion-LM servers batch (dInfer; the LLaDA serving engines behind SGLang and vLLM).

Caches: ``prefix`` keeps each request's prompt keys/values from its admission (exact for models
trained with the prefix-LM mask) and stacks them per step, left-padded to the longest prompt
(:meth:`~mmdiff.sampling.denoisers.PrefixCache.stack`); ``none`` recomputes the left-padded
prompts with the canvases. A request's tokens are the ones it gets alone (``model.generate``)
whatever else runs beside it: padding is masked out, RoPE positions count valid slots only, and
each run draws its own seeded noise. Token pruning, layer skipping, the approximate block caches
and test-time search are refused: they plan per batch, not per request.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..encoders.audio import SAMPLE_RATE
from ..flops import FlopCounter
from ..media import load_image
from ..model import GenerationResult, MultimodalDiffusionLM
from ..sampling import DecodeConfig, SamplerRun, StepEvent, StepState
from ..sampling.denoisers import FullRecompute, PrefixCache

#: requests stepped at once by default (the demo's, eval's and the server's --max-batch)
DEFAULT_MAX_BATCH = 16
#: caches the engine can batch across requests
ENGINE_CACHES: tuple[str, ...] = ("prefix", "none")


class QueueFull(Exception):
    """The engine's waiting line is full; the caller should retry later (HTTP 429)."""


class Cancelled(Exception):
    """The request was cancelled before it finished."""


@dataclass
class _Request:
    id: int
    run: SamplerRun
    decode: DecodeConfig
    question: str
    image: Any  # a loaded PIL image or None
    audio: Any  # (samples, SAMPLE_RATE) or None
    stream: bool
    handle: Handle
    t_submit: float
    embeds: torch.Tensor | None = None  # (1, P, D) after admission, left padded with its admission batch
    valid: torch.Tensor | None = None  # (1, P)
    positions: torch.Tensor | None = None  # (3, 1, P) M-RoPE prompt positions (Dimple), None for 1-D RoPE
    prefix: PrefixCache | None = None  # the prompt's keys/values (cache "prefix"), after admission


@dataclass
class Stats:
    """Counters for ``/metrics``."""

    submitted: int = 0  # requests accepted into the waiting line
    rejected: int = 0  # requests refused with QueueFull
    finished: int = 0  # answered
    cancelled: int = 0  # cancelled by their client (waiting or active)
    failed: int = 0  # ended by an error in their admission or forward
    steps: int = 0  # engine steps (each runs one forward per group)
    forwards: int = 0  # batched decoder forwards, prompt passes included
    rows: int = 0  # sum over forwards of the batch size
    tokens: int = 0  # answer tokens returned
    busy_s: float = 0.0  # time spent in steps
    flops: float = 0.0  # decoder FLOPs of every row of every forward (mmdiff.flops)


class Handle:
    """A submitted request: its step events (when streamed), its result, and cancellation."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.prompt_tokens = 0  # decoder positions of the prompt, media tokens included (set at admission)
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the request at the engine's next step (e.g. its client went away)."""
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._events.put(None)

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        """The request's step events (canvas after each step) as they happen, until it finishes.

        Raises:
            TimeoutError: no event for ``timeout`` seconds.
        """
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no step for {timeout} s") from None
            if item is None:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the answer.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            Cancelled: the request was cancelled.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class Engine:
    """A pool of requests stepped together (see the module docstring).

    Use :meth:`start` to run it in a background thread and :meth:`submit` from any thread; or call
    :meth:`step` yourself (tests, benches).

    Args:
        model: the multimodal model.
        max_batch: most requests stepped at once (more wait in line).
        max_queue: most requests waiting; :meth:`submit` raises :class:`QueueFull` beyond.
    """

    def __init__(self, model: MultimodalDiffusionLM, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.stats = Stats()
        self._counter = FlopCounter(model.cfg.decoder)
        self._pending: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stacked: dict[tuple, Any] = {}  # group key -> (request ids, batched denoiser)

    # -- requests ---------------------------------------------------------------------------------
    def check(self, decode: DecodeConfig) -> None:
        """Refuse settings the engine cannot batch, naming them."""
        if decode.cache not in ENGINE_CACHES:
            raise ValueError(f"the batching engine runs caches {', '.join(ENGINE_CACHES)}, not {decode.cache!r}")
        if decode.cache == "prefix" and self.model.exact_cache != "prefix":
            raise ValueError("cache 'prefix' is exact only for models trained with the prefix mask; this model "
                             f"uses {self.model.cfg.decoder.attn_mode!r}: use cache 'none'")
        if decode.pruning.active:
            raise ValueError("the batching engine does not prune tokens or skip layers (they plan per batch)")
        if decode.search.active:
            raise ValueError("the batching engine does not run a test-time search")

    def submit(self, question: str, *, image: Any = None, audio: Any = None, decode: DecodeConfig | None = None,
               stream: bool = False) -> Handle:
        """Check a request, read its media (on the caller's thread: a bad file is refused here) and queue
        it; the engine encodes the media and prompts of the requests it admits together, in batches.

        Args:
            question: the question ("" with a spoken question).
            image: an image (path / PIL) or None.
            audio: a clip (path / (array, rate)) or None.
            decode: sampler and cache settings (default: the sampler defaults, prefix cache on a
                prefix-LM model).
            stream: keep the step events for :meth:`Handle.events`.

        Raises:
            ValueError: bad input or settings (the message names it).
            QueueFull: too many requests waiting.
        """
        if decode is None:
            decode = DecodeConfig(cache=self.model.exact_cache)
        self.check(decode)
        [question] = self.model.check_inputs([question], images=[image], audios=[audio])
        with self._lock:
            self._refuse_if_full()  # before reading the media
        image = load_image(image) if image is not None else None
        if audio is not None:
            if self.model.audio is None:
                raise ValueError("this model has no audio encoder, but audio was given")
            audio = (self.model.audio.load(audio), SAMPLE_RATE)
        request_id = next(self._ids)
        handle = Handle(request_id)
        run = SamplerRun(batch_size=1, config=decode.sampler, mask_id=self.model.special.mask,
                         suppress_ids=(self.model.special.eos, self.model.special.pad), device=self.model.device)
        req = _Request(request_id, run, decode, question, image, audio, stream, handle, time.perf_counter())
        with self._lock:
            self._refuse_if_full()
            self._pending.append(req)
            self.stats.submitted += 1
            self._lock.notify()
        return handle

    def _refuse_if_full(self) -> None:
        """Raise :class:`QueueFull` when the waiting line is full (call with the lock held)."""
        if len(self._pending) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue})")

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) requests."""
        with self._lock:
            return len(self._active), len(self._pending)

    # -- stepping ---------------------------------------------------------------------------------
    def _admit(self, limit: int | None = None) -> None:
        """Move waiting requests into the pool (up to ``max_batch``) and encode their prompts' caches."""
        with self._lock:
            new, dropped = [], []
            while self._pending and len(self._active) + len(new) < (limit or self.max_batch):
                req = self._pending.popleft()
                (dropped if req.handle.cancelled.is_set() else new).append(req)  # its client left while waiting
        for req in dropped:
            self.stats.cancelled += 1
            req.handle._finish(None, Cancelled(f"request {req.id} was cancelled"))
        if not new:
            return
        try:  # the admitted requests' media and prompts, encoded as one batch
            embeds, valid, _, positions = self.model.prepare([r.question for r in new], images=[r.image for r in new],
                                                             audios=[r.audio for r in new], return_positions=True)
        except ValueError as e:
            if len(new) == 1:
                self.stats.failed += 1
                new[0].handle._finish(None, e)
                return
            for req in new:  # find the request that fails, alone; the others go on
                with self._lock:
                    self._pending.appendleft(req)
                self._admit(limit=len(self._active) + 1)  # alone
            return
        for i, req in enumerate(new):
            req.embeds, req.valid = embeds[i:i + 1], valid[i:i + 1]
            req.positions = None if positions is None else positions[:, i:i + 1]
            req.handle.prompt_tokens = int(valid[i].sum())
        prefixed = [r for r in new if r.decode.cache == "prefix"]
        if prefixed:  # one batched prompt pass; each request keeps its row of the cache
            idx = [new.index(r) for r in prefixed]
            rows = None if positions is None else positions[:, idx]
            batch = self._forward(len(prefixed), lambda: PrefixCache(self.model.decoder, embeds[idx], valid[idx],
                                                                     counter=self._counter, positions=rows))
            for req, part in zip(prefixed, batch.split()):
                req.prefix = part
        self._active.extend(new)

    def _forward(self, rows: int, run: Any) -> Any:
        """Run one batched decoder computation, counting it: forwards, rows and FLOPs (per row)."""
        before = self._counter.flops
        out = run()
        self.stats.forwards += 1
        self.stats.rows += rows
        self.stats.flops += (self._counter.flops - before) * rows  # the counter counts one sequence
        return out

    def _denoiser(self, key: tuple, group: list[_Request]):
        """The batched denoiser of a group, rebuilt only when its membership changes."""
        ids = tuple(r.id for r in group)
        cached = self._stacked.get(key)
        if cached is not None and cached[0] == ids:
            return cached[1]
        if key[0] == "prefix":
            denoiser = PrefixCache.stack([r.prefix for r in group], counter=self._counter)
        else:  # left-pad the prompts: the canvas follows every prompt directly
            P = max(r.embeds.shape[1] for r in group)
            embeds = torch.cat([F.pad(r.embeds, (0, 0, P - r.embeds.shape[1], 0)) for r in group])  # (B, P, D)
            valid = torch.cat([F.pad(r.valid, (P - r.valid.shape[1], 0), value=False) for r in group])  # (B, P)
            positions = None if group[0].positions is None else torch.cat(
                [F.pad(r.positions, (P - r.positions.shape[2], 0)) for r in group], dim=1)  # (3, B, P)
            denoiser = FullRecompute(self.model.decoder, embeds, valid, attn_mode=self.model.cfg.decoder.attn_mode,
                                     counter=self._counter, positions=positions)
        self._stacked[key] = (ids, denoiser)
        return denoiser

    def _finish(self, req: _Request, *, error: BaseException | None = None) -> None:
        self._active.remove(req)
        if error is not None:
            req.handle._finish(None, error)
            return
        out = req.run.output()
        tokens, fixed = out.tokens[0].tolist(), out.fixed_at[0].tolist()
        text = self.model.decode(tokens)
        self.stats.finished += 1
        self.stats.tokens += len(tokens)
        req.handle._finish(GenerationResult(text, tokens, out.nfe, time.perf_counter() - req.t_submit, fixed))

    @torch.no_grad()
    def step(self) -> int:
        """Admit waiting requests, run one denoising step for every active one (one batched decoder
        forward per group of equal canvas length and cache), finish the completed; returns the
        number of requests still active or waiting."""
        t0 = time.perf_counter()
        for req in [r for r in self._active if r.handle.cancelled.is_set()]:
            self.stats.cancelled += 1
            self._finish(req, error=Cancelled(f"request {req.id} was cancelled"))
        self._admit()
        groups: dict[tuple, list[_Request]] = collections.defaultdict(list)
        for req in self._active:
            groups[(req.decode.cache, req.run.config.gen_length)].append(req)
        for gone in self._stacked.keys() - groups.keys():  # a canvas length nobody decodes now
            del self._stacked[gone]
        for key, group in groups.items():
            try:
                denoiser = self._denoiser(key, group)
                canvas = torch.cat([r.run.canvas for r in group])  # (B, L)
                logits = self._forward(len(group), lambda: denoiser.logits(
                    StepState(canvas, 0, 0, slice(0, key[1]), self.model.special.mask)))
            except Exception as e:  # a forward that fails fails its group's requests, not the engine
                for req in group:
                    self.stats.failed += 1
                    self._finish(req, error=e)
                continue
            for i, req in enumerate(group):
                event = req.run.advance(logits[i:i + 1])
                if req.stream:
                    req.handle._events.put(StepEvent(event.step, event.block, event.canvas[0].clone(),
                                                     event.fixed[0].clone()))
                if req.run.done:
                    self._finish(req)
        self.stats.steps += 1
        self.stats.busy_s += time.perf_counter() - t0
        with self._lock:
            return len(self._active) + len(self._pending)

    def run_until_idle(self) -> None:
        """Step until nothing is active or waiting (tests, benches, batch jobs)."""
        while self.step():
            pass

    # -- background thread ------------------------------------------------------------------------
    def start(self) -> Engine:
        """Step in a background thread whenever there is work."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="mmdiff-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread; unfinished requests are cancelled."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self._active) + list(self._pending):
            req.handle._finish(None, Cancelled("the engine stopped"))
        self._active.clear()
        self._pending.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._active and not self._pending:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # never leave requests hanging: fail the active ones, keep serving
                for req in list(self._active):
                    self.stats.failed += 1
                    self._finish(req, error=e)
