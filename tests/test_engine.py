"""The step-level batching engine: a request's tokens are the ones it gets alone, whatever runs
beside it; requests join and leave between steps; what it cannot batch is refused."""
from __future__ import annotations

import random

import pytest
import torch

from mmdiff.adapters import ProjectorConfig
from mmdiff.data.scenes import render, sample_scene
from mmdiff.decoder import preset
from mmdiff.encoders.vision import preset as vision_preset
from mmdiff.model import ModelConfig, MultimodalDiffusionLM
from mmdiff.sampling import DecodeConfig, PruningConfig, SamplerConfig, SearchConfig
from mmdiff.serving.engine import Cancelled, Engine, QueueFull

QUESTIONS = ["how many circles are there?", "where is the blue square?", "is there a red cross?",
             "what color is the small circle?", "describe the image.", "how many objects are there?"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    dec = preset("tiny-test", vocab_size=len(tiny_tokenizer), attn_mode="prefix")
    vis = vision_preset("tiny-test")
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=vis.embed_dim, out_dim=dec.d_model))
    return MultimodalDiffusionLM(cfg, tiny_tokenizer).eval()


@pytest.fixture(scope="module")
def images():
    rng = random.Random(5)
    return [render(sample_scene(rng, "test"), rng) for _ in QUESTIONS]


#: settings that must coexist in one pool: canvas lengths, transfer rules, blocks, sampling, caches
DECODES = [DecodeConfig(sampler=SamplerConfig(gen_length=8), cache="prefix"),
           DecodeConfig(sampler=SamplerConfig(gen_length=8, transfer="threshold", threshold=0.3), cache="prefix"),
           DecodeConfig(sampler=SamplerConfig(gen_length=12, block_length=4, steps=6), cache="prefix"),
           DecodeConfig(sampler=SamplerConfig(gen_length=8, temperature=0.8, seed=3), cache="prefix"),
           DecodeConfig(sampler=SamplerConfig(gen_length=8), cache="none"),
           DecodeConfig(sampler=SamplerConfig(gen_length=12, transfer="factor", temperature=0.5, seed=1), cache="none")]


def alone(model, question, image, decode):
    return model.generate([question], images=[image], decode=decode)[0]


def test_a_request_among_others_gets_the_tokens_it_gets_alone(model, images):
    engine = Engine(model, max_batch=16)
    handles = [engine.submit(q, image=im, decode=d) for q, im, d in zip(QUESTIONS, images, DECODES)]
    handles += [engine.submit(q, image=im, decode=DECODES[0]) for q, im in zip(QUESTIONS, images)]
    engine.run_until_idle()
    expected = [alone(model, q, im, d) for q, im, d in zip(QUESTIONS, images, DECODES)]
    expected += [alone(model, q, im, DECODES[0]) for q, im in zip(QUESTIONS, images)]
    for h, e in zip(handles, expected):
        r = h.result(timeout=0)
        assert (r.tokens, r.nfe, r.text) == (e.tokens, e.nfe, e.text)
    # batched: far fewer decoder forwards than the requests' steps added up
    assert engine.stats.forwards < sum(e.nfe for e in expected) / 2


def test_requests_join_and_leave_between_steps(model, images):
    engine = Engine(model, max_batch=3)
    first = [engine.submit(q, image=im, decode=DECODES[1]) for q, im in zip(QUESTIONS[:2], images)]
    engine.step()
    engine.step()
    later = [engine.submit(q, image=im, decode=d) for q, im, d in zip(QUESTIONS[2:], images[2:], DECODES[2:])]
    assert engine.load == (2, 4) or engine.load[0] <= 3  # max_batch: the rest wait in line
    engine.run_until_idle()
    for h, q, im, d in zip(first + later, QUESTIONS, images, DECODES[1:2] * 2 + DECODES[2:]):
        assert h.result(timeout=0).tokens == alone(model, q, im, d).tokens
    assert engine.load == (0, 0)


def test_background_thread_streams_every_step(model, images):
    engine = Engine(model).start()
    try:
        handle = engine.submit(QUESTIONS[0], image=images[0], decode=DECODES[0], stream=True)
        events = list(handle.events(timeout=30))
        result = handle.result(timeout=30)
    finally:
        engine.stop()
    assert len(events) == result.nfe and events[-1].canvas.tolist() == result.tokens
    assert result.tokens == alone(model, QUESTIONS[0], images[0], DECODES[0]).tokens


def test_cancel_and_queue_limit(model, images):
    engine = Engine(model, max_batch=1, max_queue=1)
    h = engine.submit(QUESTIONS[0], image=images[0], decode=DECODES[0])
    with pytest.raises(QueueFull, match="the limit is 1"):
        engine.submit(QUESTIONS[1], image=images[1], decode=DECODES[0])
    h.cancel()
    engine.run_until_idle()
    with pytest.raises(Cancelled):
        h.result(timeout=0)
    assert engine.stats.cancelled == 1 and engine.stats.rejected == 1


@pytest.mark.parametrize("decode,message", [
    (DecodeConfig(cache="dual"), "runs caches prefix, none"),
    (DecodeConfig(cache="prefix", pruning=PruningConfig(skip_layers=(1,))), "does not prune"),
    (DecodeConfig(cache="prefix", search=SearchConfig(strategy="best_of_n")), "test-time search"),
])
def test_what_cannot_be_batched_is_refused(model, images, decode, message):
    with pytest.raises(ValueError, match=message):
        Engine(model).submit(QUESTIONS[0], image=images[0], decode=decode)


def test_bad_input_is_refused_before_queueing(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="no image"):
        engine.submit("how many circles are there?")
    assert engine.load == (0, 0)
