"""OpenAI chat-completion requests read into one engine request, or refused with the reason.

A request body (``POST /v1/chat/completions``) becomes a :class:`ChatRequest`: the question, at
most one image and one spoken question, the decode settings and the stream flags. Everything a
client can get wrong is a :class:`RequestError` carrying the HTTP status and a message that names
the field (``messages[2].content[1].image_url``) and the problem; :mod:`.server` answers it as
OpenAI's error object.

**Conversations.** The model answers one question about one image, so a conversation is read as:

* the **last message must be the user's**; its text parts (joined by a space) are the question and
  its ``input_audio`` part, if any, is the spoken question (at most one);
* the conversation holds **at most one image**, in any user turn: a follow-up question is asked
  about the image of an earlier turn;
* the text and audio of earlier turns and ``system`` / ``developer`` / ``assistant`` messages are
  not shown to the model (it was trained on single questions); ``tool`` messages are refused.

**Media.** ``image_url`` is a ``data:image/...;base64,`` URL, or a local file (``file://`` URL or
a plain path, relative ones under the folder) only when the server has a media folder
(``--media-dir``) and the file resolves inside it; other URLs are refused (the server fetches
nothing). ``input_audio`` is ``{"data": base64, "format": "wav" | "flac" | "ogg"}``. A part larger
than :attr:`Limits.max_media_bytes` is refused with 413; what the media layer refuses (a
decompression bomb, a clip longer than :attr:`Limits.max_audio_seconds`, unreadable data) with 400.

**Fields.** Besides ``model`` and ``messages``: ``stream``, ``stream_options.include_usage``,
``stream_options.include_canvas`` (mmdiff's: stream each step's canvas too), ``n`` (1 only),
``max_tokens`` / ``max_completion_tokens`` (the canvas length, ``gen_length``), ``temperature`` and
``seed`` (the sampler's) are honoured; the other standard fields either tune an
autoregressive sampler or annotate the request and are ignored (:data:`IGNORED`), or would change
what the client gets back and are refused unless absent or neutral (:data:`NEUTRAL`). Any other
field must be a decode option (:meth:`~mmdiff.sampling.DecodeConfig.options`: ``gen_length``,
``threshold``, ``transfer``, ``cache``, ...); an unknown one is refused.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

from ..media import MAX_QUESTION_CHARS, load_audio, read_question
from ..model import MultimodalDiffusionLM
from ..sampling import DecodeConfig, SamplerConfig

#: the server's decode settings: the shipped model's short answers (an 8-token canvas) by confident
#: decoding; the cache is chosen per model (:func:`server_defaults`)
SERVER_DECODE = DecodeConfig(sampler=SamplerConfig(gen_length=8, transfer="threshold", threshold=0.9))

#: standard fields ignored: tuning knobs of autoregressive samplers, and annotations of the request
IGNORED = frozenset({"frequency_penalty", "presence_penalty", "top_p", "logit_bias", "user", "metadata", "store",
                     "service_tier", "parallel_tool_calls", "reasoning_effort", "prediction", "web_search_options",
                     "safety_identifier", "prompt_cache_key", "verbosity"})
#: standard fields refused unless absent, null or one of these values (ignoring them would return
#: something the client did not ask for: several choices, log-probabilities, tool calls, JSON, audio)
NEUTRAL: dict[str, tuple] = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
                             "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
                             "response_format": ({"type": "text"},), "stop": ([], ""), "modalities": (["text"],),
                             "audio": ()}
#: fields read by :func:`parse_chat_request` itself
HONOURED = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens")
#: content part types of a user message
PART_TYPES = ("text", "image_url", "input_audio")
#: ``input_audio`` formats (what the media layer reads)
AUDIO_FORMATS = ("wav", "flac", "ogg")
ROLES = ("system", "developer", "user", "assistant")


def server_defaults(model: MultimodalDiffusionLM) -> DecodeConfig:
    """:data:`SERVER_DECODE` with the exact prefix cache on a model trained with the prefix-LM mask
    (``none`` on others)."""
    return SERVER_DECODE.replace(cache=model.exact_cache)


class RequestError(Exception):
    """A request refused: HTTP ``status``, OpenAI error ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Limits:
    """What one request may hold (413 beyond a byte limit, 400 beyond the others)."""

    max_body_bytes: int = 32 << 20  # the whole JSON body
    max_media_bytes: int = 16 << 20  # one image or clip, decoded
    max_audio_seconds: float = 30.0  # one clip (the Whisper encoder's own limit)
    max_question_chars: int = MAX_QUESTION_CHARS  # the question text


@dataclass(frozen=True)
class Media:
    """An image or clip of a request: decoded bytes, or a file under the media folder."""

    where: str  # its place in the request, e.g. "messages[0].content[1].image_url"
    data: bytes | None = None
    path: Path | None = None


@dataclass(frozen=True)
class ChatRequest:
    """One question to answer, read from a chat-completion request."""

    question: str
    image: Media | None
    audio: Media | None
    decode: DecodeConfig
    stream: bool
    include_usage: bool  # a last chunk with the usage
    include_canvas: bool  # an mmdiff.canvas event per step


def parse_chat_request(body: Any, *, model_name: str, defaults: DecodeConfig, limits: Limits,
                       media_dir: Path | None) -> ChatRequest:
    """Read a chat-completion request body (the rules are in the module docstring).

    Args:
        body: the parsed JSON body.
        model_name: the served model's name; ``body["model"]`` must equal it.
        defaults: the server's decode settings, which the request's fields change.
        limits: size limits.
        media_dir: the folder local image files may come from (None: no local files).

    Raises:
        RequestError: naming the field and the problem.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_request", f"the body must be a JSON object, got {type(body).__name__}")
    if "model" not in body:
        raise RequestError(400, "missing_model", f"'model' is required (this server serves {model_name!r})")
    if body["model"] != model_name:
        raise RequestError(404, "model_not_found", f"model {body['model']!r} is not served here; "
                                                   f"this server serves {model_name!r} (GET /v1/models)")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "invalid_value", f"'stream' must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "invalid_value", f"'stream_options' must be an object, got {options!r}")
    decode = decode_settings(body, defaults)  # before the media are decoded
    question, image, audio = read_messages(body.get("messages"), limits=limits, media_dir=media_dir)
    return ChatRequest(question, image, audio, decode, stream, bool(options.get("include_usage")),
                       bool(options.get("include_canvas")))


def decode_settings(body: Mapping[str, Any], defaults: DecodeConfig) -> DecodeConfig:
    """``defaults`` changed by the body's decode options (``max_tokens`` / ``max_completion_tokens``
    = ``gen_length``), after refusing non-neutral standard fields and unknown ones."""
    for key, allowed in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in allowed:
            raise RequestError(400, "unsupported_parameter", f"{key!r} = {body[key]!r} is not supported by this "
                               f"server" + (f" (only {' or '.join(map(repr, allowed))})" if allowed else ""))
    keys = {o.key for o in DecodeConfig.options()}
    unknown = sorted(set(body) - keys - IGNORED - set(NEUTRAL) - set(HONOURED))
    if unknown:
        raise RequestError(400, "unknown_parameter", f"unknown field(s) {unknown}: besides OpenAI's fields, a "
                                                     f"request takes decode options: {', '.join(sorted(keys))}")
    values = {k: v for k, v in body.items() if k in keys}
    lengths = {k: body[k] for k in ("gen_length", "max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(set(map(repr, lengths.values()))) > 1:
        raise RequestError(400, "invalid_value", f"{' and '.join(lengths)} disagree ({lengths}); they all set "
                                                 "the canvas length: give one")
    if lengths:
        values["gen_length"] = next(iter(lengths.values()))
    try:
        return defaults.with_values(values, parse=True)
    except (ValueError, TypeError) as e:
        raise RequestError(400, "invalid_decode_option", str(e)) from None


def read_messages(messages: Any, *, limits: Limits, media_dir: Path | None
                  ) -> tuple[str, Media | None, Media | None]:
    """(question, image, spoken question) of a conversation (the rules are in the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "invalid_messages", "'messages' must be a non-empty list of messages")
    images: list[Media] = []
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, "invalid_messages", f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(400, "invalid_messages", f"{where}.role {role!r} is not supported; one of "
                                                        f"{', '.join(ROLES)} (this server runs no tools)")
        parts = content_parts(message.get("content"), where=f"{where}.content", user=role == "user")
        if role == "user":
            images += [read_image(p, where=w, limits=limits, media_dir=media_dir) for w, p in parts
                       if p["type"] == "image_url"]
        turns.append((role, parts))
    if len(images) > 1:
        raise RequestError(400, "too_many_images", f"this model takes one image per conversation, got {len(images)} "
                                                   f"({', '.join(m.where for m in images)})")
    role, parts = turns[-1]
    if role != "user":
        raise RequestError(400, "invalid_messages", f"the last message must be the user's question, not {role!r}")
    text = " ".join(p["text"].strip() for _, p in parts if p["type"] == "text" and p["text"].strip())
    clips = [read_audio(p, where=w, limits=limits) for w, p in parts if p["type"] == "input_audio"]
    if len(clips) > 1:
        raise RequestError(400, "too_many_clips", f"a question takes one spoken clip, got {len(clips)} "
                                                  f"({', '.join(m.where for m in clips)})")
    try:
        question = read_question(text, max_chars=limits.max_question_chars)
    except ValueError as e:
        raise RequestError(400, "invalid_question", f"messages[{len(messages) - 1}]: {e}") from None
    return question, (images or [None])[0], (clips or [None])[0]


def content_parts(content: Any, *, where: str, user: bool) -> list[tuple[str, dict]]:
    """A message's content as ``(place, part)`` pairs, each part checked for its type's fields."""
    if content is None and not user:
        return []
    if isinstance(content, str):
        return [(where, {"type": "text", "text": content})]
    if not isinstance(content, list):
        raise RequestError(400, "invalid_content", f"{where} must be a string or a list of content parts")
    known = PART_TYPES if user else ("text", "refusal")
    out = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in known:
            raise RequestError(400, "invalid_content_part", f"{w}: unknown content part type {kind!r}; "
                                                            f"known: {', '.join(known)}")
        field = {"text": "text", "refusal": "refusal", "image_url": "image_url", "input_audio": "input_audio"}[kind]
        if field not in part:
            raise RequestError(400, "invalid_content_part", f"{w}: a {kind!r} part needs a {field!r} field")
        if kind == "text" and not isinstance(part["text"], str):
            raise RequestError(400, "invalid_content_part", f"{w}.text must be a string")
        out.append((w, part))
    return out


def read_image(part: dict, *, where: str, limits: Limits, media_dir: Path | None) -> Media:
    """An ``image_url`` part: a base64 ``data:`` URL, or a file under ``media_dir``."""
    spec = part["image_url"]
    url = spec.get("url") if isinstance(spec, dict) else spec
    where = f"{where}.image_url"
    if not isinstance(url, str) or not url:
        raise RequestError(400, "invalid_image_url", f"{where}: expected {{'url': 'data:image/png;base64,...'}}")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not re.fullmatch(r"data:image/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64", head):
            raise RequestError(400, "invalid_image_url", f"{where}: a data URL must be data:image/<type>;base64,"
                                                         f"<data>, got {head[:60]!r}")
        return Media(where, data=b64decode(payload, where=where, limits=limits))
    scheme = urlparse(url).scheme
    if scheme in ("http", "https", "ftp"):
        raise RequestError(400, "invalid_image_url", f"{where}: this server fetches no URLs; send the image as a "
                                                     "data: URL (base64)")
    if scheme not in ("", "file") and not re.fullmatch(r"[A-Za-z]", scheme):
        raise RequestError(400, "invalid_image_url", f"{where}: unsupported URL scheme {scheme!r}")
    given = unquote(urlparse(url).path) if scheme == "file" else url
    return Media(where, path=local_file(given, where=where, limits=limits, media_dir=media_dir))


def local_file(given: str, *, where: str, limits: Limits, media_dir: Path | None) -> Path:
    """A file a request names, only inside ``media_dir`` (symbolic links resolved first)."""
    if media_dir is None:
        raise RequestError(403, "media_not_allowed", f"{where}: local files are refused: the server has no media "
                                                     "folder (mmdiff serve --media-dir); send a data: URL")
    root = media_dir.resolve()
    path = (root / given).resolve()  # an absolute ``given`` replaces root
    if not path.is_relative_to(root):
        raise RequestError(403, "media_not_allowed", f"{where}: {given} is outside the media folder")
    if not path.is_file():
        raise RequestError(400, "invalid_image_url", f"{where}: {given}: no such file in the media folder")
    if path.stat().st_size > limits.max_media_bytes:
        raise RequestError(413, "media_too_large", f"{where}: {given} is {path.stat().st_size} bytes; the limit "
                                                   f"is {limits.max_media_bytes}")
    return path


def read_audio(part: dict, *, where: str, limits: Limits) -> Media:
    """An ``input_audio`` part: ``{"data": base64, "format": ...}``."""
    spec = part["input_audio"]
    where = f"{where}.input_audio"
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise RequestError(400, "invalid_audio", f"{where}: expected {{'data': base64, 'format': 'wav'}}")
    if spec.get("format", "wav") not in AUDIO_FORMATS:
        raise RequestError(400, "invalid_audio", f"{where}.format {spec.get('format')!r} is not supported; one "
                                                 f"of {', '.join(AUDIO_FORMATS)}")
    return Media(where, data=b64decode(spec["data"], where=f"{where}.data", limits=limits))


def b64decode(text: str, *, where: str, limits: Limits) -> bytes:
    """Standard base64 (whitespace allowed), its size checked before decoding."""
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > limits.max_media_bytes:
        raise RequestError(413, "media_too_large", f"{where}: about {len(text) * 3 // 4} bytes; the limit is "
                                                   f"{limits.max_media_bytes}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, "invalid_base64", f"{where}: not valid base64 ({e})") from None
    if not data:
        raise RequestError(400, "invalid_base64", f"{where}: empty")
    return data


@contextlib.contextmanager
def media_files(request: ChatRequest, *, limits: Limits) -> Iterator[tuple[Path | None, Path | None]]:
    """(image path, clip path) of a request while it is encoded (decoded bytes are written to a
    temporary folder). The clip is read once here, to refuse one over
    :attr:`Limits.max_audio_seconds` from its header. A ``ValueError`` raised inside the block (the
    media layer's, the model's) becomes a 400 whose message names each file by its place in the
    request (``cannot read image messages[0].content[1].image_url: ...``), not by a server path.

    Raises:
        RequestError: what the media layer or the model refuses (400).
    """
    with tempfile.TemporaryDirectory(prefix="mmdiff-serve-") as tmp:
        paths, places = [], {}
        for media, name in ((request.image, "image"), (request.audio, "audio")):
            path = None if media is None else media.path or Path(tmp) / name
            if media is not None and media.data is not None:
                path.write_bytes(media.data)
            if path is not None:
                places[str(path)] = media.where
            paths.append(path)
        try:
            if paths[1] is not None:
                load_audio(paths[1], max_seconds=limits.max_audio_seconds)
            yield paths[0], paths[1]
        except ValueError as e:
            message = str(e)
            for path, where in places.items():
                message = message.replace(path, where)
            raise RequestError(400, media_code(message), message) from None


def media_code(message: str) -> str:
    """The error code of a media layer's message (its documented ``cannot read image|audio`` prefix)."""
    for kind in ("image", "audio"):
        if message.startswith(f"cannot read {kind}"):
            return f"invalid_{kind}"
    return "invalid_input"
