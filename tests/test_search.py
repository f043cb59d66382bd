"""Self-verifying test-time search: exact NFE accounting, N = 1 / T = 0 equals plain decoding,
resuming and refining through the one sampler, verifiers on a model trained on a toy verification
task, reproducibility, configuration and flags, and the benchmark script."""
from __future__ import annotations

import argparse
import importlib.util
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmdiff.commands.options import add_decode_arguments, decode_config_from_args
from mmdiff.data.questions import ask
from mmdiff.data.scenes import render, sample_scene
from mmdiff.sampling import DecodeConfig, SamplerConfig, SearchConfig, iter_sample
from mmdiff.sampling.denoisers import build_denoiser
from mmdiff.search import (
    ConfidenceTrace,
    SearchRun,
    checkpoint_step,
    elbo_masks,
    elbo_score,
    elbo_yes_score,
    exploration_configs,
    remask_least_confident,
    resume_config,
    search,
    yes_no_ids,
    yes_probability,
)
from mmdiff.tasks.prompts import NO, YES, verification_question

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "how many circles are there?"
TOY_CANVAS = 4


@pytest.fixture(scope="module")
def tok(world_tokenizer):
    """The real tokenizer recipe (as the trainer builds it): questions and answers of the world."""
    return world_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.decoder import preset
    from mmdiff.encoders.vision import preset as vision_preset
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    torch.manual_seed(0)
    cfg = ModelConfig(decoder=preset("tiny-test", vocab_size=len(tok), attn_mode="prefix"),
                      vision=vision_preset("tiny-test"),
                      vision_adapter=ProjectorConfig(kind="mlp2x_gelu", in_dim=32, out_dim=32))
    return MultimodalDiffusionLM(cfg, tok).eval()


@pytest.fixture(scope="module")
def image():
    return render(sample_scene(random.Random(1), "test"))


class ForwardCounter:
    """Counts decoder forwards of single sequences (a batch of B counts B) with a pre-forward hook."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.n = 0
        self.handle = decoder.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args and args[0] is not None else kwargs.get("input_ids")
        self.n += (x if x is not None else kwargs["inputs_embeds"]).shape[0]

    def __enter__(self) -> "ForwardCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def run_counted(model, image, config, scfg, cache="none"):
    with ForwardCounter(model.decoder) as counter:
        res = search(model, QUESTION, image=image, decode=DecodeConfig(sampler=config, search=scfg, cache=cache))
    return res, counter.n


# ------------------------------------------------------------------------------------------------
# NFE accounting
# ------------------------------------------------------------------------------------------------
SAMPLERS = {
    "one block": SamplerConfig(gen_length=8),
    "blocks": SamplerConfig(gen_length=8, block_length=4, steps=4),
    "threshold": SamplerConfig(gen_length=8, transfer="threshold", threshold=0.05, temperature=0.7, seed=2),
}


@pytest.mark.parametrize("strategy", ["none", "best_of_n", "hierarchical"])
@pytest.mark.parametrize("verifier", ["elbo", "yesno", "elbo_yesno"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_nfe_counts_every_decoder_forward(model, image, strategy, verifier, sampler, cache):
    scfg = SearchConfig(strategy=strategy, candidates=5, refine=2, verifier=verifier, checkpoints=(0.25, 0.6),
                        elbo_samples=3)
    res, forwards = run_counted(model, image, SAMPLERS[sampler], scfg, cache)
    assert res.nfe == forwards > 0


def test_identical_candidates_are_scored_once(model, image):
    greedy = SearchConfig(strategy="best_of_n", candidates=6, temperature=0.0, remasking=("low_confidence",),
                          elbo_samples=3)
    res, forwards = run_counted(model, image, SamplerConfig(gen_length=8), greedy)
    assert res.nfe == forwards == 6 * 8 + 1 * 3 and len(res.candidates) == 1


def test_nfe_formulas_are_linear(model, image):
    """Greedy costs steps; best-of-N N * (steps + K); hierarchical N * (s1 + K) + M * (steps - s1 + K)
    + T * (r * steps + K), which grows linearly in N + T."""
    cfg, K = SamplerConfig(gen_length=8), 2  # at temperature 5 no two canvases of the random model coincide
    base = SearchConfig(candidates=8, refine=3, keep=0.5, checkpoints=(0.5,), elbo_samples=K, refine_ratio=0.25,
                        temperature=5.0)
    assert search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=base)).nfe == 8
    best_of_8 = replace(base, strategy="best_of_n")
    assert search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=best_of_8)).nfe == 8 * (8 + K)
    hier = replace(base, strategy="hierarchical")
    assert search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=hier)).nfe == 8 * (4 + K) + 4 * (4 + K) + 3 * (2 + K)
    nfe = {(n, t): search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=replace(hier, candidates=n, refine=t))).nfe
           for n in (4, 8, 16) for t in (0, 2, 4)}
    assert nfe[16, 0] - nfe[8, 0] == 2 * (nfe[8, 0] - nfe[4, 0])  # linear in N
    assert nfe[8, 4] - nfe[8, 2] == nfe[8, 2] - nfe[8, 0] == 2 * (2 + K)  # linear in T, independent of N
    assert nfe[16, 2] - nfe[16, 0] == nfe[4, 2] - nfe[4, 0]


# ------------------------------------------------------------------------------------------------
# equivalences: the search reuses the one sampler
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["none", "best_of_n", "hierarchical"])
@pytest.mark.parametrize("config,cache", [
    (SamplerConfig(gen_length=8), "none"),
    (SamplerConfig(gen_length=8, temperature=0.9, remasking="random", seed=3), "none"),
    (SamplerConfig(gen_length=8, block_length=4, steps=4, transfer="factor"), "prefix"),
])
def test_one_candidate_no_refinement_is_plain_decoding(model, image, strategy, config, cache):
    plain = model.generate([QUESTION], images=[image], decode=DecodeConfig(sampler=config, cache=cache))[0]
    res = search(model, QUESTION, image=image, decode=DecodeConfig(sampler=config, cache=cache, search=SearchConfig(strategy=strategy, candidates=1, refine=0)))
    assert res.tokens == plain.tokens and res.text == plain.text
    assert res.nfe == plain.nfe + (cache == "prefix")  # the prefix cache's prompt pass is a forward too
    assert res.candidates == [(plain.text, None)]


@pytest.mark.parametrize("config,fraction", [(SamplerConfig(gen_length=8), 0.4),
                                             (SamplerConfig(gen_length=12, steps=6, schedule="linear"), 0.5),
                                             (SamplerConfig(gen_length=8, block_length=2, steps=8), 0.5)])
def test_resuming_a_partial_canvas_equals_the_uninterrupted_run(model, image, config, fraction):
    run = SearchRun(model, QUESTION, ([model.encode_image([image])[0]], []), decode=DecodeConfig(sampler=config))
    full = run.denoise(config, 1)[0]
    step = checkpoint_step(config, fraction)
    partial = run.denoise(config, 1, stop_after=step)[0]
    assert partial.steps_done == step and (partial.tokens == model.special.mask).any()
    assert not (partial.lookahead == model.special.mask).any()
    resumed = run.denoise(resume_config(config, step), 1, canvas=partial.tokens[None],
                          confidence=partial.confidence[None], steps_done=step)[0]
    assert torch.equal(resumed.tokens, full.tokens) and resumed.steps_done == full.steps_done


def test_checkpoints_and_resume_settings():
    one = SamplerConfig(gen_length=8)
    assert [checkpoint_step(one, f) for f in (0.01, 0.5, 0.99)] == [1, 4, 7]
    assert resume_config(one, 3).steps == 5 and resume_config(one, 0) is one
    assert checkpoint_step(SamplerConfig(gen_length=1), 0.5) is None
    blocks = SamplerConfig(gen_length=8, block_length=2, steps=8)  # 4 blocks of 2 steps
    assert [checkpoint_step(blocks, f) for f in (0.1, 0.5, 0.9)] == [2, 4, 6]
    assert resume_config(blocks, 4) is blocks


def test_exploration_starts_from_the_plain_decode():
    cfg = SamplerConfig(gen_length=8, seed=11)
    groups = exploration_configs(cfg, SearchConfig(candidates=6, temperature=0.8, seed=5,
                                                   remasking=("margin", "entropy")))
    assert groups[0] == (cfg, 1)
    assert [(c.remasking, c.temperature, c.seed, rows) for c, rows in groups[1:]] == [("margin", 0.8, 5, 3),
                                                                                      ("entropy", 0.8, 6, 2)]
    assert exploration_configs(cfg, SearchConfig(candidates=1)) == [(cfg, 1)]


def test_confidence_trace_records_fix_time_confidence_and_lookahead(model, image):
    config = SamplerConfig(gen_length=6)  # greedy, one token per step: the most confident is fixed first
    run = SearchRun(model, QUESTION, ([model.encode_image([image])[0]], []), decode=DecodeConfig(sampler=config))
    empty = torch.full((1, 6), run.mask_id)
    probs = model(run.embeds, run.valid, empty).float().softmax(-1)  # (1, 6, V) at step 0
    trace = ConfidenceTrace()
    denoiser = build_denoiser("none", model.decoder, run.embeds, run.valid, attn_mode=model.cfg.decoder.attn_mode)
    steps = iter_sample(denoiser, batch_size=1, config=config, mask_id=run.mask_id, strategies=[trace])
    first = next(steps)
    assert torch.allclose(trace.confidence[first.fixed], probs.max(-1).values.max(), atol=1e-5)
    assert (trace.confidence[~first.fixed] == 0).all()
    assert torch.equal(trace.lookahead, probs.argmax(-1))  # the fixed token is the argmax too (greedy)
    for _ in steps:
        pass
    assert (trace.confidence > 0).all() and torch.equal(trace.lookahead, first.canvas.new_tensor(
        model.generate([QUESTION], images=[image], decode=DecodeConfig(sampler=config))[0].tokens)[None])


@pytest.mark.parametrize("verifier", ["elbo", "yesno"])
def test_partial_canvases_are_scored_with_or_without_lookahead(model, image, verifier):
    config, scores = SamplerConfig(gen_length=8), {}
    for lookahead in (True, False):
        run = SearchRun(model, QUESTION, ([model.encode_image([image])[0]], []),
                        decode=DecodeConfig(sampler=config, search=SearchConfig(verifier=verifier, lookahead=lookahead)))
        partial = run.denoise(config, 1, stop_after=3)
        canvas = partial[0].lookahead if lookahead else partial[0].tokens
        scores[lookahead] = run.score(partial)[0].score
        assert scores[lookahead] == pytest.approx(run.verify(canvas[None])[0])
    assert scores[True] != scores[False]


def test_remask_least_confident():
    canvas = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.1], [0.2, 0.3, 0.4, 0.01]])
    assert remask_least_confident(canvas, conf, 2, 0).tolist() == [[5, 0, 7, 0], [0, 10, 11, 0]]


def test_refinement_keeps_the_better_version(model, image):
    res = search(model, QUESTION, image=image, decode=DecodeConfig(sampler=SamplerConfig(gen_length=8), search=SearchConfig(strategy="hierarchical", candidates=4, refine=3, temperature=2.0)))
    scores = [s for _, s in res.candidates]
    assert scores == sorted(scores, reverse=True) and res.text == res.candidates[0][0]
    assert len({t for t, _ in res.candidates}) == len(res.candidates)


# ------------------------------------------------------------------------------------------------
# verifiers
# ------------------------------------------------------------------------------------------------
def test_elbo_masks_are_fixed_counts_of_decided_positions_in_complementary_pairs():
    M = 0
    canvas = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, M, 7, M, 9, M, M, M]])
    masked, t, n = elbo_masks(canvas, M, samples=4, seed=0)
    assert masked.shape == (2, 4, 8) and n.tolist() == [8, 3]
    # samples 0, 1 mask max(1, round((k + 1/2) / K * n)); samples 3, 2 mask their complements
    assert masked.sum(-1).tolist() == [[1, 3, 5, 7], [1, 1, 2, 2]]
    decided = canvas != M
    for a, b in ((0, 3), (1, 2)):  # every decided token is masked exactly once per pair
        assert torch.equal(masked[:, a] ^ masked[:, b], decided) and not (masked[:, a] & masked[:, b]).any()
    torch.testing.assert_close(t, masked.sum(-1) / n[:, None].float())
    odd, _, _ = elbo_masks(canvas, M, samples=3, seed=0)
    assert odd.sum(-1).tolist() == [[1, 4, 7], [1, 2, 2]] and torch.equal(odd[:, 0] ^ odd[:, 2], decided)
    again, _, _ = elbo_masks(canvas, M, samples=4, seed=0)
    assert torch.equal(masked, again) and not torch.equal(masked, elbo_masks(canvas, M, samples=4, seed=1)[0])


def test_verification_question_is_the_data_family_template():
    rng = random.Random(0)
    for _ in range(30):
        qa = ask(sample_scene(rng, "train"), rng, "verify")
        if qa is None:
            continue
        base, proposal = re.fullmatch(r"(.*\?) answer: (.*)\. is that right\?", qa.question).groups()
        assert verification_question(base, proposal) == qa.question


def test_yes_no_ids_resolve_through_the_tokenizer(tok):
    yes, no = yes_no_ids(tok)
    assert tok.decode([yes]) == YES and tok.decode([no]) == NO


def test_yes_no_ids_need_single_tokens():
    from mmdiff.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="'yes' to be a single token"):
        yes_no_ids(train_tokenizer(["abc abd"] * 5, vocab_size=270))


NAME_EVEN = "name an even digit."
EVEN, ODD = [str(n) for n in range(0, 10, 2)], [str(n) for n in range(1, 10, 2)]


@pytest.fixture(scope="module")
def toy():
    """A text-only model trained for 200 steps (~4 s) with the real masked-diffusion loss on a toy
    task: "is <n> even?" -> yes / no, "name an even digit." -> 0, 2, 4, 6 or 8, and its verification
    questions ("name an even digit. answer: 3. is that right?" -> no). (Verifying "is 3 even?
    answer: yes." needs the XOR of two facts, which a model this small does not learn in 300 steps.)"""
    from mmdiff.decoder import preset
    from mmdiff.losses import diffusion_loss, forward_mask
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM
    from mmdiff.tokenizer import train_tokenizer

    parity = [(f"is {n} even?", YES if n % 2 == 0 else NO) for n in range(10)]
    data = (parity + [(NAME_EVEN, d) for d in EVEN]
            + [(verification_question(NAME_EVEN, d), YES if d in EVEN else NO) for d in EVEN + ODD])
    tok = train_tokenizer([q for q, _ in data] * 5 + [YES, NO] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = MultimodalDiffusionLM(ModelConfig(decoder=preset("tiny-test", vocab_size=len(tok), d_model=64,
                                                             mlp_hidden=128)), tok)
    prompts = [model.format_prompt(q) for q, _ in data]
    responses = torch.tensor([toy_canvas(model, a) for _, a in data])  # (len(data), TOY_CANVAS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    for _ in range(200):
        idx = [rng.randrange(len(data)) for _ in range(32)]
        embeds, valid = model.embed_prompt([prompts[i] for i in idx])
        targets, masked, t = forward_mask(responses[idx], generator=g)
        loss = diffusion_loss(model(embeds, valid, targets.masked_fill(masked, model.special.mask)), targets, masked, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), parity


def toy_canvas(model, answer: str) -> list[int]:
    """``answer`` + EOS fill: the response canvas the model is trained on."""
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + [model.special.eos] * (TOY_CANVAS - len(ids))


def verifier_scores(model, question: str, answers: list[str], verifier) -> tuple[list[float], int]:
    run = SearchRun(model, question, ([], []), decode=DecodeConfig(sampler=SamplerConfig(gen_length=TOY_CANVAS),
                                                                   search=SearchConfig(elbo_samples=2)))
    with torch.no_grad():
        scores = verifier(run, torch.tensor([toy_canvas(model, a) for a in answers])).tolist()
    return scores, run.nfe


def test_elbo_ranks_the_true_answer_above_a_wrong_one(toy):
    model, parity = toy
    for question, truth in parity:
        (right, wrong), nfe = verifier_scores(model, question, [truth, NO if truth == YES else YES], elbo_score)
        assert right > wrong, (question, truth, right, wrong)
        assert nfe == 2 * 2  # K = 2 masks per candidate
    scores, _ = verifier_scores(model, NAME_EVEN, EVEN + ODD, elbo_score)
    assert min(scores[:5]) > max(scores[5:])


def test_yes_no_verifier_ranks_the_true_answer_above_a_wrong_one(toy):
    model, _ = toy
    scores, nfe = verifier_scores(model, NAME_EVEN, EVEN + ODD, yes_probability)
    assert min(scores[:5]) > 0.5 > max(scores[5:]) and nfe == 10
    scores, nfe = verifier_scores(model, NAME_EVEN, EVEN + ODD, elbo_yes_score)
    assert min(scores[:5]) > max(scores[5:]) and nfe == 10 * (2 + 1)


@pytest.mark.parametrize("verifier", ["elbo", "yesno", "elbo_yesno"])
def test_search_returns_the_verified_answer(toy, verifier):
    """At temperature 3 most trajectories are wrong; the verifier picks a right one."""
    model, parity = toy
    cases = [(NAME_EVEN, EVEN)] + ([(q, [a]) for q, a in parity[:4]] if verifier != "yesno" else [])
    for question, right in cases:
        res = search(model, question, decode=DecodeConfig(sampler=SamplerConfig(gen_length=TOY_CANVAS), search=SearchConfig(strategy="best_of_n", candidates=8, temperature=3.0, verifier=verifier)))
        assert res.text in right, (question, res.candidates)
        assert any(text not in right for text, _ in res.candidates)  # there were wrong ones to reject


# ------------------------------------------------------------------------------------------------
# reproducibility, configuration, flags, inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["best_of_n", "hierarchical"])
def test_results_are_reproducible_from_the_seed(model, image, strategy):
    cfg = SamplerConfig(gen_length=8)
    scfg = SearchConfig(strategy=strategy, candidates=6, refine=2, temperature=1.5, seed=4)
    a, b = (search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=scfg)) for _ in range(2))
    assert (a.text, a.tokens, a.nfe, a.candidates) == (b.text, b.tokens, b.nfe, b.candidates)
    c = search(model, QUESTION, image=image, decode=DecodeConfig(sampler=cfg, search=replace(scfg, seed=5)))
    assert c.candidates != a.candidates


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="beam"), "Unknown search strategy 'beam'; known: best_of_n, hierarchical, none"),
    (dict(verifier="judge"), "Unknown verifier 'judge'; known: elbo, elbo_yesno, yesno"),
    (dict(remasking=("low_confidence", "nope")), "Unknown remasking rule 'nope'"),
    (dict(candidates=0), "candidates must be >= 1"),
    (dict(refine=-1), "refine must be >= 0"),
    (dict(keep=0.0), r"keep must be in \(0, 1\]"),
    (dict(checkpoints=(0.5, 0.25)), "checkpoints must be increasing fractions"),
    (dict(checkpoints=(1.0,)), "checkpoints must be increasing fractions"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(elbo_samples=0), "elbo_samples must be >= 1"),
    (dict(refine_ratio=0.0), r"refine_ratio must be in \(0, 1\]"),
])
def test_bad_search_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_search_config_round_trips_through_a_dict():
    cfg = SearchConfig(strategy="hierarchical", checkpoints=(0.25, 0.5), remasking=("margin",))
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    assert SearchConfig.from_dict(as_json) == cfg
    with pytest.raises(ValueError, match="unknown SearchConfig keys"):
        SearchConfig.from_dict({"width": 3})


def test_flags_build_the_search_config():
    p = argparse.ArgumentParser()
    add_decode_arguments(p)
    assert decode_config_from_args(p.parse_args([])).search == SearchConfig()
    args = p.parse_args(["--search", "hierarchical", "--candidates", "4", "--refine", "2", "--verifier", "yesno",
                         "--keep", "0.25", "--checkpoints", "0.3", "0.6", "--no-lookahead",
                         "--search-temperature", "0.7",
                         "--search-remasking", "margin", "--elbo-samples", "3", "--refine-ratio", "0.5",
                         "--search-seed", "9"])
    assert decode_config_from_args(args).search == SearchConfig(
        strategy="hierarchical", candidates=4, refine=2, verifier="yesno", keep=0.25, checkpoints=(0.3, 0.6),
        lookahead=False, temperature=0.7, remasking=("margin",), elbo_samples=3, refine_ratio=0.5, seed=9)
    with pytest.raises(ValueError, match="Unknown verifier 'judge'"):
        decode_config_from_args(p.parse_args(["--verifier", "judge"]))


def test_bad_inputs(model, image):
    with pytest.raises(ValueError, match="empty question and no audio"):
        search(model, "  ", image=image)
    with pytest.raises(ValueError, match="Unknown cache 'disk'; known: block, dual, none, prefix"):
        search(model, QUESTION, image=image, decode=DecodeConfig(cache="disk"))


# ------------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------------
def test_benchmark_script_runs_on_a_tiny_model(model, tmp_path, capsys, monkeypatch):
    model.save_pretrained(tmp_path / "m")
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "bench" / "search.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tmp_path / "m"), "--n", "1", "--budgets", "2", "3", "--caption-length", "12",
                       "--types", "count", "caption", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| method | N | T | NFE | count | caption | mean acc | oracle acc | latency ms |" in out
    assert sum(line.startswith("| hierarchical |") for line in out.splitlines()) == 2
    assert "best-of-2: mean acc" in out and "hardest type '" in out
    assert bench.score_answer("Three", ["3"], "count") == 1.0
