"""``mmdiff serve``: an OpenAI-compatible HTTP server on the step-level batching engine.

Endpoints (FastAPI on uvicorn):

* ``POST /v1/chat/completions``: a question (text and/or ``input_audio``) about an image
  (``image_url``), read by :mod:`.chat` (its docstring states the rules for conversations, media and
  fields), answered by the :class:`~.engine.Engine` with the server's decode settings changed by the
  request's decode options. ``stream: true`` answers with server-sent events: unnamed
  ``chat.completion.chunk`` events whose ``delta.content`` carries only text no later step can change
  (:func:`.stream.final_text`), which an OpenAI client joins into the answer; then ``data: [DONE]``.
  With ``stream_options: {"include_canvas": true}`` each step also sends an ``event: mmdiff.canvas``
  event holding the step's whole canvas (:func:`.stream.canvas_view`) in an ``mmdiff_canvas`` field of
  a chunk with an empty delta (so a client that does not skip named events, as the ``openai`` package
  does not, sees a chunk without content). It is opt-in: a plain OpenAI stream stays small.
  A completion carries ``usage`` (``completion_tokens``: the answer's tokens before EOS;
  ``prompt_tokens``: the decoder positions of the prompt, image and audio tokens included),
  ``finish_reason`` (``stop`` at EOS, ``length`` when the answer filled the canvas) and an ``mmdiff``
  field: ``{"nfe", "latency_s"}``.
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model.
* ``GET /health``: ``{"status": "ok", "active": ..., "waiting": ...}``, without the API key.
* ``GET /metrics``: Prometheus text: requests and responses by status, the engine's counters
  (admitted, queue-full rejections, finished, cancelled, failed, steps, forwards, batch rows, answer
  tokens, busy seconds, decoder FLOPs) and the active / waiting gauges.

Errors are OpenAI's ``{"error": {"message", "type", "code"}}``: 400 for bad input (named), 401
without the API key, 403 for a local file outside the media folder, 404 for another model, 413 over a
byte limit (:class:`.chat.Limits`), 429 with ``Retry-After`` (and ``retry-after-ms``) when the
engine's waiting line is full, 500 for a failure of the server itself, which keeps serving, 503 for a
request the engine dropped when it stopped. A client
that disconnects cancels its request. With an API key (``--api-key`` / ``MMDIFF_API_KEY``) every
endpoint but ``/health`` needs ``Authorization: Bearer KEY``; without one the server binds loopback
addresses only (:func:`check_exposure`).

Default decode settings (:func:`server_defaults`): the shipped model's short answers, an 8-token
canvas, confident decoding (``transfer=threshold``, ``threshold=0.9``), and the exact prefix cache on
models trained with the prefix-LM mask (``cache=none`` on others).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..loading import load
from ..model import GenerationResult, MultimodalDiffusionLM
from ..sampling import DecodeConfig, StepEvent
from .chat import ChatRequest, Limits, RequestError, media_files, parse_chat_request, server_defaults
from .engine import DEFAULT_MAX_BATCH, Cancelled, Engine, Handle, QueueFull
from .stream import canvas_view, final_text

log = logging.getLogger("mmdiff")

#: OpenAI's error type of each status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
#: the engine's counters as (metric, type, help, Stats field)
ENGINE_METRICS = [
    ("mmdiff_engine_submitted_total", "counter", "requests queued by the engine", "submitted"),
    ("mmdiff_engine_rejected_total", "counter", "requests refused because the waiting line was full (429)", "rejected"),
    ("mmdiff_engine_finished_total", "counter", "requests answered", "finished"),
    ("mmdiff_engine_cancelled_total", "counter", "requests cancelled (client disconnected)", "cancelled"),
    ("mmdiff_engine_failed_total", "counter", "requests failed by an error in a decoder forward", "failed"),
    ("mmdiff_engine_steps_total", "counter", "engine steps (one batched forward per canvas group)", "steps"),
    ("mmdiff_engine_forwards_total", "counter", "batched decoder forwards, prompt passes included", "forwards"),
    ("mmdiff_engine_batch_rows_total", "counter", "rows over all forwards (rows / forwards = mean batch)", "rows"),
    ("mmdiff_engine_tokens_total", "counter", "canvas tokens returned", "tokens"),
    ("mmdiff_engine_busy_seconds_total", "counter", "seconds spent stepping", "busy_s"),
    ("mmdiff_engine_decoder_flops_total", "counter", "decoder FLOPs (mmdiff.flops)", "flops"),
]
CANVAS_EVENT = "mmdiff.canvas"


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve a non-loopback address without an API key.

    Raises:
        ValueError: one line naming the host and the fix.
    """
    if api_key:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"--host {host} opens the server to the network: set an API key (--api-key or "
                         "MMDIFF_API_KEY), or bind 127.0.0.1")


def error_response(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error object."""
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                                   "param": None, "code": code}}, status_code=status, headers=headers)


class _Server:
    """The app's state: the engine, the settings and the response counters."""

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None, media_dir: Path | None,
                 limits: Limits, decode: DecodeConfig) -> None:
        self.engine, self.model = engine, engine.model
        self.model_name, self.api_key, self.media_dir, self.limits = model_name, api_key, media_dir, limits
        self.decode = decode
        self.created = int(time.time())
        self.requests = 0
        self.responses: Counter[int] = Counter()

    # -- requests ---------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer KEY'")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refused over :attr:`Limits.max_body_bytes` (413) or malformed (400)."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise RequestError(413, "request_too_large", f"the body is {length} bytes; the limit is {limit}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, "request_too_large", f"the body is over the {limit}-byte limit")
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, "invalid_json", f"the body is not valid JSON: {e}") from None

    def submit(self, chat: ChatRequest) -> Handle:
        """Encode the request's media and queue it (blocking: run in a worker thread)."""
        with media_files(chat, limits=self.limits) as (image, audio):
            return self.engine.submit(chat.question, image=image, audio=audio, decode=chat.decode,
                                      stream=chat.stream)

    def retry_after(self) -> float:
        """Seconds until a place in the waiting line is likely free: the engine's busy time per
        answered request (how often one leaves), between 0.1 and 10 s; 1 s before any answer."""
        stats = self.engine.stats
        return min(10.0, max(0.1, stats.busy_s / stats.finished)) if stats.finished else 1.0

    # -- answers ----------------------------------------------------------------------------------
    def completion(self, rid: str, created: int, result: GenerationResult, prompt: int) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": self.finish_reason(result), "logprobs": None}],
                "usage": self.usage(result, prompt),
                "mmdiff": {"nfe": result.nfe, "latency_s": round(result.latency_s, 4)}}

    def finish_reason(self, result: GenerationResult) -> str:
        """``stop`` when the answer ended with EOS, ``length`` when it filled the canvas."""
        return "stop" if self.model.special.eos in result.tokens else "length"

    def usage(self, result: GenerationResult, prompt: int) -> dict[str, int]:
        """Answer tokens (up to EOS) and ``prompt`` tokens (the decoder positions of the prompt)."""
        sp = self.model.special
        answer = result.tokens[:result.tokens.index(sp.eos)] if sp.eos in result.tokens else result.tokens
        completion = sum(t not in (sp.pad, sp.mask) for t in answer)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, rid: str, created: int, delta: dict[str, Any], finish: str | None = None,
              **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def follow(handle: Handle, request: Request) -> AsyncIterator[StepEvent | GenerationResult]:
    """The handle's step events, then its result, as they happen; the request is cancelled when the
    client disconnects (or this iterator is closed early).

    Raises:
        Exception: what the engine finished the request with (``Cancelled``, a failed forward).
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            loop.call_soon_threadsafe(items.put_nowait, item)

    def pump() -> None:  # the handle blocks: one thread per request forwards it to the loop
        try:
            for event in handle.events():
                put(event)
            put(handle.result())
        except BaseException as e:  # noqa: BLE001 - handed to the request, re-raised there
            put(e)

    threading.Thread(target=pump, name=f"mmdiff-serve-{handle.id}", daemon=True).start()
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(items.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return  # the client went away (finally cancels)
            item = get.result()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return
    finally:
        gone.cancel()
        if not handle.done:
            handle.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine_or_model: Engine | MultimodalDiffusionLM, *, model_name: str, api_key: str | None = None,
              allowed_media_dir: str | Path | None = None, limits: Limits | None = None,
              decode: DecodeConfig | None = None) -> FastAPI:
    """The FastAPI app (endpoints and rules in the module docstring).

    Args:
        engine_or_model: an engine (started here, left running at shutdown) or a model (an engine
            with the default batch and queue sizes is made, started and stopped with the app).
        model_name: the name clients send as ``model``.
        api_key: required as ``Authorization: Bearer KEY`` when set.
        allowed_media_dir: the folder ``image_url`` may name local files in (None: none).
        limits: request size limits.
        decode: the server's decode settings (default :func:`server_defaults`).

    Raises:
        ValueError: ``decode`` has settings the engine cannot batch.
    """
    owned = not isinstance(engine_or_model, Engine)
    engine = Engine(engine_or_model) if owned else engine_or_model
    decode = decode or server_defaults(engine.model)
    engine.check(decode)
    media_dir = Path(allowed_media_dir) if allowed_media_dir is not None else None
    state = _Server(engine, model_name=model_name, api_key=api_key or None, media_dir=media_dir,
                    limits=limits or Limits(), decode=decode)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if owned:
            engine.stop()

    app = FastAPI(title="mmdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return error_response(e.status, e.code, e.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, None, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        log.exception("mmdiff serve: %s %s failed", request.method, request.url.path)
        return error_response(500, "server_error", f"the server failed on this request: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, waiting = engine.load
        return {"status": "ok", "model": model_name, "active": active, "waiting": waiting}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        state.authorize(request)
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.authorize(request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        state.authorize(request)
        if name != model_name:
            raise RequestError(404, "model_not_found", f"model {name!r} is not served here; this server serves "
                                                       f"{model_name!r}")
        return model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.requests += 1
        try:
            response = await answer(state, request)
        except RequestError as e:
            response = error_response(e.status, e.code, e.message)
        except QueueFull as e:
            wait = state.retry_after()
            response = error_response(429, "queue_full", f"the server is busy ({e}); retry in {wait:.1f} s",
                                      headers={"Retry-After": str(math.ceil(wait)),
                                               "retry-after-ms": str(round(wait * 1000))})
        except Cancelled as e:  # the engine stopped (the server is shutting down)
            response = error_response(503, "cancelled", f"the request was not answered: {e}")
        except Exception as e:  # a bug or a failed forward: this request fails, the server keeps serving
            log.exception("mmdiff serve: a chat completion failed")
            response = error_response(500, "server_error", f"the server failed on this request: "
                                                           f"{type(e).__name__}: {e}")
        state.responses[response.status_code] += 1
        return response

    return app


async def answer(state: _Server, request: Request) -> Response:
    """One chat completion: read, queue, then wait for the answer or stream its steps."""
    state.authorize(request)
    chat = parse_chat_request(await state.read_json(request), model_name=state.model_name, defaults=state.decode,
                              limits=state.limits, media_dir=state.media_dir)
    try:
        state.engine.check(chat.decode)
    except ValueError as e:
        raise RequestError(400, "invalid_decode_option", str(e)) from None
    handle = await run_in_threadpool(state.submit, chat)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if chat.stream:
        return StreamingResponse(events(state, chat, handle, request, rid, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with contextlib.aclosing(follow(handle, request)) as items:
        async for item in items:
            if isinstance(item, GenerationResult):
                return JSONResponse(state.completion(rid, created, item, handle.prompt_tokens))
    return Response(status_code=499)  # the client went away: nobody reads this


async def events(state: _Server, chat: ChatRequest, handle: Handle, request: Request, rid: str, created: int,
                 ) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer (see the module docstring)."""
    sent = ""  # the answer's text sent so far: only ever extended
    yield sse(state.chunk(rid, created, {"role": "assistant", "content": ""}))
    try:
        async with contextlib.aclosing(follow(handle, request)) as items:
            async for item in items:
                if isinstance(item, StepEvent) and chat.include_canvas:
                    yield sse(state.chunk(rid, created, {}, mmdiff_canvas=canvas_view(state.model, item)),
                              CANVAS_EVENT)
                text = item.text if isinstance(item, GenerationResult) else final_text(state.model,
                                                                                       item.canvas.tolist())
                if not text.startswith(sent):  # never: final_text only grows (tests/test_serve.py)
                    log.error("mmdiff serve: streamed %r but the answer is %r", sent, text)
                elif len(text) > len(sent):
                    yield sse(state.chunk(rid, created, {"content": text[len(sent):]}))
                    sent = text
                if isinstance(item, GenerationResult):
                    yield sse(state.chunk(rid, created, {}, state.finish_reason(item)))
                    if chat.include_usage:
                        yield sse({**state.chunk(rid, created, {}), "choices": [], "usage": state.usage(item, handle.prompt_tokens)})
    except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in an event
        yield sse({"error": {"message": f"the request failed: {type(e).__name__}: {e}", "type": "server_error",
                             "param": None, "code": "request_failed"}})
    yield "data: [DONE]\n\n"


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_card(state: _Server) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mmdiff"}


def metrics_text(state: _Server) -> str:
    """Prometheus text format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    active, waiting = state.engine.load
    metric("mmdiff_requests_total", "counter", "chat-completion requests received", [("", state.requests)])
    metric("mmdiff_responses_total", "counter", "chat-completion responses by HTTP status",
           [(f'{{code="{code}"}}', n) for code, n in sorted(state.responses.items())])
    metric("mmdiff_active_requests", "gauge", "requests being denoised", [("", active)])
    metric("mmdiff_waiting_requests", "gauge", "requests waiting for a place in the batch", [("", waiting)])
    for name, kind, help_, field in ENGINE_METRICS:
        metric(name, kind, help_, [("", getattr(state.engine.stats, field))])
    return "\n".join(lines) + "\n"


def serve(model: str | Path | MultimodalDiffusionLM, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None, api_key: str | None = None, media_dir: str | Path | None = None,
          max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 64, decode: DecodeConfig | None = None,
          limits: Limits | None = None, log_level: str = "info") -> None:
    """Serve a model (a directory :func:`mmdiff.load` reads, or a loaded model) until interrupted.

    Args:
        model: the model or its directory.
        host, port: where to listen; a non-loopback host needs ``api_key``.
        model_name: the name clients send (default: the directory's name).
        api_key: required as ``Authorization: Bearer KEY`` when set.
        media_dir: the folder ``image_url`` may name local files in.
        max_batch, max_queue: the engine's batch and waiting-line sizes.
        decode: the server's decode settings (default :func:`server_defaults`).
        limits: request size limits.
        log_level: uvicorn's.

    Raises:
        ValueError: a non-loopback host without an API key, or decode settings the engine cannot batch.
    """
    check_exposure(host, api_key)
    if not isinstance(model, MultimodalDiffusionLM):
        model_name = model_name or Path(model).resolve().name
        model = load(str(model))
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    app = build_app(engine, model_name=model_name or "mmdiff", api_key=api_key, allowed_media_dir=media_dir,
                    limits=limits, decode=decode)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
