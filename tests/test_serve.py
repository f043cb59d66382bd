"""``mmdiff serve`` driven by the real ``openai`` client against a real uvicorn server on a free local
port: answers equal ``model.generate`` alone with the same decode settings (alone, streamed, among 8
concurrent requests); the queue limit answers 429 with Retry-After and a retrying client gets through;
each bad input gets its 4xx naming the problem while the server keeps serving; a client that
disconnects cancels its request; the API key, /v1/models, /health and /metrics."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import uvicorn
from PIL import Image

from mmdiff import cli
from mmdiff.adapters import ProjectorConfig, SemanticAdapterConfig
from mmdiff.data.scenes import render, sample_scene
from mmdiff.decoder import preset as decoder_preset
from mmdiff.encoders import AudioEncoderConfig
from mmdiff.encoders.vision import preset as vision_preset
from mmdiff.model import ModelConfig, MultimodalDiffusionLM
from mmdiff.serving.chat import Limits, server_defaults
from mmdiff.serving.engine import Engine
from mmdiff.serving.server import build_app, check_exposure
from mmdiff.serving.stream import final_text

openai = pytest.importorskip("openai")

NAME = "tiny"
QUESTIONS = ["how many red circles are there?", "where is the blue square?", "is there a red cross?",
             "what color is the small circle?", "describe the image.", "how many objects are there?",
             "is there a square?", "where is the yellow circle?"]
#: decode options a request may send, each on top of the server's defaults
OPTIONS = [{}, {"gen_length": 12, "threshold": 0.5}, {"transfer": "schedule"}, {"temperature": 0.7, "seed": 3},
           {"max_tokens": 16, "transfer": "factor"}, {"cache": "none", "threshold": 0.3}, {}, {"gen_length": 4}]
#: a long request (one token per step over a long canvas): still running when its client leaves
SLOW = {"gen_length": 512, "transfer": "schedule"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(question: str | None, image: bytes | str | None = None, *, audio: bytes | None = None,
         fmt: str = "wav") -> dict:
    parts = [{"type": "text", "text": question}] if question is not None else []
    if image is not None:
        url = image if isinstance(image, str) else data_url(image)
        parts.append({"type": "image_url", "image_url": {"url": url}})
    if audio is not None:
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(),
                                                             "format": fmt}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MultimodalDiffusionLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG files of rendered scenes (their folder is the server's media folder)."""
    root = tmp_path_factory.mktemp("media")
    rng = random.Random(7)
    paths = []
    for i in range(len(QUESTIONS)):
        paths.append(root / f"scene{i}.png")
        render(sample_scene(rng, "test"), rng).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=16, max_queue=64)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine, images):
    limits = Limits(max_body_bytes=3 << 20, max_media_bytes=1 << 20)
    with running(build_app(engine, model_name=NAME, allowed_media_dir=images[0].parent, limits=limits)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def alone(model, question, image, options=None, audio=None):
    decode = server_defaults(model).with_values(
        {("gen_length" if k == "max_tokens" else k): v for k, v in (options or {}).items()})
    return model.generate([question], images=[image], audios=[audio], decode=decode)[0]


def ask(client, question, image_path, options=None, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[user(question, image_path.read_bytes())],
                                          extra_body=options or None, **kwargs)


# -- answers ----------------------------------------------------------------------------------------
def test_the_answer_is_the_models_alone(client, model, images):
    for q, im, opts in zip(QUESTIONS[:6], images, OPTIONS):
        reply = ask(client, q, im, opts)
        expected = alone(model, q, im, opts)
        assert reply.choices[0].message.content == expected.text, (q, opts)
        assert reply.model_extra["mmdiff"]["nfe"] == expected.nfe
        assert reply.model == NAME and reply.id.startswith("chatcmpl-") and reply.created > 0
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens <= len(expected.tokens)


def test_temperature_and_seed_are_the_samplers(client, model, images):
    """OpenAI's temperature and seed set the sampler's: a seeded sample is reproducible."""
    replies = [ask(client, QUESTIONS[0], images[0], temperature=1.5, seed=s).choices[0].message.content
               for s in (11, 11)]
    assert replies[0] == replies[1] == alone(model, QUESTIONS[0], images[0], {"temperature": 1.5, "seed": 11}).text


def test_streamed_answer_joins_to_the_answer_and_shows_the_canvas(client, url, model, images):
    q, im, opts = QUESTIONS[4], images[4], {"gen_length": 16, "transfer": "schedule"}
    expected = alone(model, q, im, opts)
    plain = list(ask(client, q, im, opts, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == expected.text
    assert plain[-1].choices[0].finish_reason == ("stop" if model.special.eos in expected.tokens else "length")
    assert not any("mmdiff_canvas" in c.model_extra for c in plain)
    # with the canvas and the usage: the openai client sees the canvas events as chunks without content
    chunks = list(ask(client, q, im, opts, stream=True, stream_options={"include_usage": True,
                                                                         "include_canvas": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert sum("mmdiff_canvas" in c.model_extra for c in chunks) == expected.nfe
    assert chunks[-1].usage.completion_tokens >= 0 and not chunks[-1].choices
    # the raw events: the canvas of every step (event mmdiff.canvas), the text growing, [DONE]
    body = {"model": NAME, "messages": [user(q, im.read_bytes())], "stream": True, **opts,
            "stream_options": {"include_canvas": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    canvases = [json.loads(b[len("data: "):])["mmdiff_canvas"] for a, b in zip(lines, lines[1:])
                if a == "event: mmdiff.canvas"]
    assert len(canvases) == expected.nfe == 16
    assert canvases[0]["masked"] == 15 and canvases[-1]["ids"] == expected.tokens and canvases[-1]["masked"] == 0
    assert "<|mask|>" in canvases[0]["tokens"] and [c["step"] for c in canvases] == list(range(1, 17))
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines[:-1]
              if line.startswith("data: ") and "mmdiff_canvas" not in line]
    assert "".join(d or "" for d in deltas) == expected.text


def test_streamed_text_is_never_taken_back(model, tiny_tokenizer):
    """final_text of any partly masked canvas is a prefix of the finished canvas's answer, with and
    without a tokenizer that cleans up spaces before punctuation."""
    rng = random.Random(0)
    sp = model.special
    vocab = [i for i in range(len(tiny_tokenizer)) if i not in (sp.mask, sp.pad)]
    for clean in (False, True):
        model.tokenizer.clean_up_tokenization_spaces = clean
        try:
            for _ in range(300):
                tokens = [rng.choice(vocab) for _ in range(rng.randint(1, 10))]
                full = model.decode(tokens)
                order = list(range(len(tokens)))
                rng.shuffle(order)
                canvas, shown = [sp.mask] * len(tokens), ""
                for i in order:
                    canvas[i] = tokens[i]
                    now = final_text(model, canvas)
                    assert now.startswith(shown) and full.startswith(now), (tokens, canvas, now, full)
                    shown = now
                assert shown == full
        finally:
            model.tokenizer.clean_up_tokenization_spaces = False


def test_concurrent_requests_are_each_answered_as_alone(client, model, images, engine):
    forwards = engine.stats.forwards
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda args: ask(client, *args).choices[0].message.content,
                                zip(QUESTIONS, images, OPTIONS)))
    assert replies == [alone(model, q, im, o).text for q, im, o in zip(QUESTIONS, images, OPTIONS)]
    assert engine.stats.forwards > forwards


def test_a_local_file_under_the_media_folder(client, model, images):
    for url in (images[1].as_uri(), images[1].name):
        reply = client.chat.completions.create(model=NAME, messages=[user(QUESTIONS[1], url)])
        assert reply.choices[0].message.content == alone(model, QUESTIONS[1], images[1]).text
    (images[0].parent / "notes.png").write_text("not a picture")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=NAME, messages=[user(QUESTIONS[1], "notes.png")])
    message = refused.value.body["message"]
    assert message == "cannot read image messages[0].content[1].image_url: not an image file (unknown format)"


def test_a_follow_up_question_is_about_the_conversations_image(client, model, images):
    messages = [{"role": "system", "content": "be brief"}, user(QUESTIONS[0], images[2].read_bytes()),
                {"role": "assistant", "content": "2"}, user(QUESTIONS[3])]
    reply = client.chat.completions.create(model=NAME, messages=messages)
    assert reply.choices[0].message.content == alone(model, QUESTIONS[3], images[2]).text


def test_a_spoken_question(tmp_path, tiny_tokenizer, images):
    torch.manual_seed(0)
    cfg = ModelConfig(decoder=decoder_preset("tiny-test", vocab_size=len(tiny_tokenizer)),
                      vision=vision_preset("tiny-test"),
                      vision_adapter=ProjectorConfig(kind="linear", in_dim=32, out_dim=32),
                      audio=AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                               encoder_ffn_dim=64, max_source_positions=150, max_seconds=3.0),
                      audio_adapter=SemanticAdapterConfig(kind="audio_semantic", in_dim=32, out_dim=32))
    speaking = MultimodalDiffusionLM(cfg, tiny_tokenizer).eval()
    clip = tmp_path / "q.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 330 * np.arange(16000) / 16000)).astype(np.float32), 16000)
    with running(build_app(speaking, model_name=NAME)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=NAME, messages=[user(None, images[0].read_bytes(), audio=clip.read_bytes())])
    assert reply.choices[0].message.content == alone(speaking, "", images[0], audio=clip).text


# -- the queue --------------------------------------------------------------------------------------
def test_a_full_queue_answers_429_and_a_retrying_client_gets_through(model, images):
    engine = Engine(model, max_batch=1, max_queue=1)
    try:
        with running(build_app(engine, model_name=NAME)) as base:
            body = {"model": NAME, "messages": [user(QUESTIONS[0], images[0].read_bytes())],
                    "gen_length": 96, "transfer": "schedule"}
            with ThreadPoolExecutor(6) as pool:
                raw = list(pool.map(lambda _: httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60),
                                    range(6)))
            busy = [r for r in raw if r.status_code == 429]
            assert busy and all(r.status_code == 200 for r in raw if r not in busy)
            assert int(busy[0].headers["Retry-After"]) >= 1 and int(busy[0].headers["retry-after-ms"]) >= 100
            assert busy[0].json()["error"]["code"] == "queue_full" and "the limit is 1" in busy[0].text
            retrying = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=30, timeout=60)
            with ThreadPoolExecutor(6) as pool:
                replies = list(pool.map(lambda i: ask(retrying, QUESTIONS[i], images[i]).choices[0].message.content,
                                        range(6)))
            assert replies == [alone(model, QUESTIONS[i], images[i]).text for i in range(6)]
            assert engine.stats.rejected > len(busy)  # the retrying client was refused too, then got through
    finally:
        engine.stop()


def test_a_client_that_disconnects_cancels_its_request(url, engine, images):
    body = {"model": NAME, "messages": [user(QUESTIONS[0], images[0].read_bytes())], **SLOW}
    for stream in (False, True):
        cancelled, finished = engine.stats.cancelled, engine.stats.finished
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
                assert next(r.iter_lines()).startswith("data: ")  # the first chunk: the request runs
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
        deadline = time.monotonic() + 10
        while engine.stats.cancelled == cancelled:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.02)
        assert engine.stats.finished == finished and engine.load == (0, 0)


def test_a_request_the_stopping_engine_drops_gets_503(model, images):
    engine = Engine(model)
    with running(build_app(engine, model_name=NAME)) as base:
        body = {"model": NAME, "messages": [user(QUESTIONS[0], images[0].read_bytes())], **SLOW}
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=30)
            while engine.load == (0, 0):
                time.sleep(0.01)
            engine.stop()
            r = reply.result()
    assert r.status_code == 503 and r.json()["error"]["code"] == "cancelled"


# -- bad input --------------------------------------------------------------------------------------
def flac_of(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(8000 * seconds), dtype=np.int16), 8000, format="FLAC")
    return buf.getvalue()


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buf, format="PNG")  # 27 KB
    return buf.getvalue()


def good(images):
    return {"model": NAME, "messages": [user(QUESTIONS[0], images[0].read_bytes())]}


BAD = {  # name -> (body or raw bytes from the good body, status, code, words of the message)
    "bad base64": (lambda g, im: {**g, "messages": [user("hi", "data:image/png;base64,@@not base64@@")]},
                   400, "invalid_base64", "messages[0].content[1].image_url: not valid base64"),
    "decompression bomb": (lambda g, im: {**g, "messages": [user("hi", bomb())]},
                           400, "invalid_image", "cannot read image messages[0].content[1].image_url: 15000 x 15000 "
                                                 "pixels (225 MP) is over the 64 MP limit"),
    "unknown content part": (lambda g, im: {**g, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": "x"}}]}]},
                             400, "invalid_content_part", "unknown content part type 'video_url'"),
    "unknown model": (lambda g, im: {**g, "model": "gpt-4o"}, 404, "model_not_found", "'gpt-4o' is not served"),
    "10-minute clip": (lambda g, im: {**g, "messages": [user("hi", im, audio=flac_of(600), fmt="flac")]},
                       400, "invalid_audio", "clip is 600.00 s long; the limit is 30 s"),
    "malformed JSON": (lambda g, im: b'{"model": "tiny", "messages": [', 400, "invalid_json", "not valid JSON"),
    "NaN": (lambda g, im: json.dumps(g)[:-1].encode() + b', "temperature": NaN}', 400, "invalid_json", "NaN"),
    "missing image": (lambda g, im: {**g, "messages": [user("how many circles are there?")]},
                      400, "invalid_input", "no image: this model answers questions about an image"),
    "two images": (lambda g, im: {**g, "messages": [user("hi", im), user("and?", im)]},
                   400, "too_many_images", "one image per conversation, got 2"),
    "unknown field": (lambda g, im: {**g, "foo": 1}, 400, "unknown_parameter", "unknown field(s) ['foo']"),
    "bad decode value": (lambda g, im: {**g, "threshold": 2}, 400, "invalid_decode_option", "threshold"),
    "unbatchable cache": (lambda g, im: {**g, "cache": "dual"}, 400, "invalid_decode_option", "runs caches"),
    "several choices": (lambda g, im: {**g, "n": 2}, 400, "unsupported_parameter", "'n' = 2"),
    "last turn not the user's": (lambda g, im: {**g, "messages": g["messages"] + [
        {"role": "assistant", "content": "3"}]}, 400, "invalid_messages", "the last message must be the user's"),
    "a URL": (lambda g, im: {**g, "messages": [user("hi", "https://example.com/a.png")]},
              400, "invalid_image_url", "fetches no URLs"),
    "outside the media folder": (lambda g, im: {**g, "messages": [user("hi", "file:///etc/passwd")]},
                                 403, "media_not_allowed", "/etc/passwd is outside the media folder"),
    "large image": (lambda g, im: {**g, "messages": [user("hi", bytes(1 << 20) + b"x")]},
                    413, "media_too_large", "the limit is 1048576"),
    "large body": (lambda g, im: {**g, "padding": "x" * (3 << 20)}, 413, "request_too_large", "the limit is 3145728"),
    "not a bool": (lambda g, im: {**g, "stream": "yes"}, 400, "invalid_value", "'stream' must be true or false"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_naming_it_and_the_server_keeps_serving(url, client, model, images, case):
    make, status, code, words = BAD[case]
    body = make(good(images), images[1].read_bytes())
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"] and error["type"], error
    assert ask(client, QUESTIONS[0], images[0]).choices[0].message.content == alone(model, QUESTIONS[0], images[0]).text


def test_the_openai_client_raises_the_errors(client, images):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[user("hi", images[0].read_bytes())])
    with pytest.raises(openai.BadRequestError, match="unknown content part type"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [{"type": "file"}]}])


def test_ignored_standard_fields(client, model, images):
    reply = ask(client, QUESTIONS[0], images[0], top_p=0.5, user="someone", presence_penalty=0.1, n=1)
    assert reply.choices[0].message.content == alone(model, QUESTIONS[0], images[0]).text


# -- endpoints, key, exposure -----------------------------------------------------------------------
def test_models_health_and_metrics(client, url, engine):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and {"active", "waiting"} <= set(health)
    text = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ("mmdiff_requests_total", "mmdiff_active_requests", "mmdiff_waiting_requests",
                 "mmdiff_engine_rejected_total", "mmdiff_engine_steps_total", "mmdiff_engine_forwards_total",
                 "mmdiff_engine_batch_rows_total", "mmdiff_engine_tokens_total", "mmdiff_engine_busy_seconds_total",
                 "mmdiff_engine_decoder_flops_total", 'mmdiff_responses_total{code="200"}'):
        assert name in values, name
    assert values["mmdiff_engine_finished_total"] == engine.stats.finished > 0
    assert values["mmdiff_engine_decoder_flops_total"] > 0
    r = httpx.get(f"{url}/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_the_api_key_is_required_when_set(engine, images, model):
    with running(build_app(engine, model_name=NAME, api_key="sekret")) as base:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert ask(keyed, QUESTIONS[0], images[0]).choices[0].message.content == \
            alone(model, QUESTIONS[0], images[0]).text
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200


def test_a_network_host_needs_an_api_key():
    check_exposure("127.0.0.1", None)
    check_exposure("localhost", None)
    check_exposure("0.0.0.0", "key")
    with pytest.raises(ValueError, match="opens the server to the network: set an API key"):
        check_exposure("0.0.0.0", None)


def test_the_command_refuses_with_one_line(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.delenv("MMDIFF_API_KEY", raising=False)
    assert cli.main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip().endswith("set an API key (--api-key or MMDIFF_API_KEY), or bind 127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port} is already in use" in err


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1 and --max-queue >= 0, got 0, 64"),
    (["--max-queue", "-1"], "--max-batch must be >= 1 and --max-queue >= 0, got 16, -1"),
    (["--media-dir", "/nonexistent/media"], "--media-dir /nonexistent/media: no such folder"),
    (["--threshold", "2"], "threshold must be in (0, 1], got 2.0"),
])
def test_the_command_refuses_bad_flags_with_one_line(capsys, tiny_model_dir, flags, message):
    assert cli.main(["serve", "--model", str(tiny_model_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith(message)
