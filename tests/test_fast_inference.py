"""Fast inference: caches, visual-token pruning, layer skipping, FLOP counting.

Equivalence tests for every optimisation (cache on/off, keep ratio 1, layer-skip off give the same
output), exactness of the decoder's token dropping against a reference that removes the tokens by
hand, a hand FLOP count on the tiny config, and the strategies composed in one run.
"""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

from mmdiff.commands.options import add_decode_arguments, decode_config_from_args
from mmdiff.decoder import Decoder, LayerPlan, LayerShape, preset, rope_cos_sin
from mmdiff.flops import FlopCounter, forward_flops
from mmdiff.sampling import DecodeConfig, FullRecompute, PrefixCache, SamplerConfig, StepState, sample
from mmdiff.sampling.autoregressive import ar_generate
from mmdiff.sampling.denoisers import CACHES, BlockCache, build_denoiser
from mmdiff.sampling.pruning import LayerPlanner, PruningConfig, StepPlan, divprune_order, keep_mask

MASK = 0
P, L = 12, 8  # prompt and canvas lengths of the decoder-level tests
MEDIA = slice(2, 10)  # image token positions inside the prompt


def lively(attn_mode: str = "bidirectional", seed: int = 0) -> Decoder:
    """A tiny decoder with large random weights, so greedy answers vary from position to position."""
    torch.manual_seed(seed)
    d = Decoder(preset("tiny-test", attn_mode=attn_mode)).eval()
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    return d


def prompt(d: Decoder, B: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, P), generator=g)
    media = torch.zeros(B, P, dtype=torch.bool)
    media[:, MEDIA] = True
    return d.embed(ids).detach(), torch.ones(B, P, dtype=torch.bool), media


class Drop(LayerPlan):
    """Drop fixed positions before one layer (and optionally probe / skip)."""

    def __init__(self, layer: int, keep: torch.Tensor, probe_at: int | None = None,
                 queries: torch.Tensor | None = None, skip: frozenset[int] = frozenset()) -> None:
        self.layer, self.keep_, self.probe_at, self.queries, self.skip_ = layer, keep, probe_at, queries, skip
        self.seen: dict[int, torch.Tensor | None] = {}

    def keep(self, layer, received):
        self.seen[layer] = received
        return self.keep_ if layer == self.layer else None

    def probe(self, layer):
        return self.queries if layer == self.probe_at else None

    def skip(self, layer):
        return layer in self.skip_


def drop_positions(B: int, T: int, dropped: list[int]) -> torch.Tensor:
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[:, dropped] = False
    return keep


# ------------------------------------------------------------------------------------------------
# decoder: token dropping through a LayerPlan
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bidirectional", "prefix", "causal"])
def test_plan_that_keeps_everything_is_bitwise_noop(mode):
    d = lively(mode)
    x = torch.randn(2, 9, d.cfg.d_model)
    queries = torch.zeros(2, 9)
    queries[:, -3:] = 1
    ref = d(inputs_embeds=x, attn_mode=mode, prefix_len=5).logits
    plan = Drop(1, torch.ones(2, 9, dtype=torch.bool), probe_at=0, queries=queries)
    out = d(inputs_embeds=x, attn_mode=mode, prefix_len=5, plan=plan)
    assert torch.equal(out.logits, ref)
    torch.testing.assert_close(plan.seen[1].sum(-1), torch.ones(2))  # the probe's scores reached the plan
    assert out.layers_run == [LayerShape(9, 9, 3), LayerShape(9, 9, 0)]


@pytest.mark.parametrize("mode", ["bidirectional", "prefix"])
def test_dropping_before_layer_0_equals_removing_the_tokens(mode):
    """Tokens dropped before the first layer are as if never there (RoPE positions kept)."""
    d = lively(mode)
    x = torch.randn(2, 10, d.cfg.d_model)
    dropped = [1, 2, 6]
    kept = [i for i in range(10) if i not in dropped]
    out = d(inputs_embeds=x, attn_mode=mode, prefix_len=4, plan=Drop(0, drop_positions(2, 10, dropped))).logits
    pos = torch.tensor(kept).expand(2, -1)
    ref = d(inputs_embeds=x[:, kept], attn_mode=mode, prefix_len=2, position_ids=pos).logits  # 2 prompt tokens kept
    torch.testing.assert_close(out[:, kept], ref, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 10, d.cfg.vocab_size)


def test_dropping_before_layer_k_matches_a_hand_run():
    """Layers < K see every token; layers >= K only the kept ones; dropped rows keep their state."""
    d = lively()
    x = torch.randn(2, 10, d.cfg.d_model)
    dropped, kept = [3, 4, 5], [0, 1, 2, 6, 7, 8, 9]
    out = d(inputs_embeds=x, plan=Drop(1, drop_positions(2, 10, dropped)), output_hidden_states=True)
    h = d(inputs_embeds=x, output_hidden_states=True).hidden_states[1]  # (B, T, D) after layer 0
    cos, sin = rope_cos_sin(torch.tensor(kept).expand(2, -1), d.cfg.head_dim, d.cfg.rope_theta)
    h_kept, _ = d.layers[1](h[:, kept], cos, sin, None)
    torch.testing.assert_close(out.logits[:, kept], d.forward_head(h_kept), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[:, dropped], d.forward_head(h[:, dropped]), rtol=1e-5, atol=1e-5)
    assert out.layers_run == [LayerShape(10, 10, 0), LayerShape(7, 7, 0)]
    assert [t.shape for t in out.hidden_states] == [x.shape] * 3


def test_pruned_prompt_cache_equals_pruning_in_one_pass():
    """Prefix mask: a prompt pass that drops tokens stores dead cache slots; later tokens attending
    to that cache see what one pass with the same drops sees."""
    d = lively("prefix")
    ids = torch.randint(3, 128, (2, 14))
    keep = drop_positions(2, 14, [2, 3, 7])
    full = d(ids, attn_mode="prefix", prefix_len=10, plan=Drop(1, keep)).logits[:, 10:]
    pre = d(ids[:, :10], attn_mode="prefix", prefix_len=10, store_cache=True, plan=Drop(1, keep[:, :10]))
    assert pre.cache.alive_at(0) is None and pre.cache.alive_at(1)[:, [2, 3, 7]].sum() == 0
    rest = d(ids[:, 10:], attn_mode="prefix", prefix_len=10, cache=pre.cache).logits
    torch.testing.assert_close(rest, full, rtol=1e-5, atol=1e-5)


def test_dropping_cached_positions_masks_them():
    d = lively("prefix")
    ids = torch.randint(3, 128, (2, 14))
    keep = drop_positions(2, 14, [2, 3, 7])
    full = d(ids, attn_mode="prefix", prefix_len=10, plan=Drop(1, keep)).logits[:, 10:]
    pre = d(ids[:, :10], attn_mode="prefix", prefix_len=10, store_cache=True)
    rest = d(ids[:, 10:], attn_mode="prefix", prefix_len=10, cache=pre.cache, plan=Drop(1, keep))
    torch.testing.assert_close(rest.logits, full, rtol=1e-5, atol=1e-5)
    assert rest.layers_run == [LayerShape(4, 14, 0), LayerShape(4, 11, 0)]  # dropped cached keys are left out


def test_uneven_cached_drops_are_gathered_with_padding():
    """Rows dropping different numbers of cached positions: each row's live slots are gathered, the
    shorter row padded and masked; each row's answer equals one pass of that row alone."""
    d = lively("prefix")
    ids = torch.randint(3, 128, (2, 14))
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[0, [2, 3, 7]] = False
    keep[1, [5]] = False
    full = torch.cat([d(ids[b:b + 1], attn_mode="prefix", prefix_len=10, plan=Drop(1, keep[b:b + 1])).logits[:, 10:]
                      for b in range(2)])
    pre = d(ids[:, :10], attn_mode="prefix", prefix_len=10, store_cache=True)
    rest = d(ids[:, 10:], attn_mode="prefix", prefix_len=10, cache=pre.cache, plan=Drop(1, keep))
    torch.testing.assert_close(rest.logits, full, rtol=1e-5, atol=1e-5)
    assert rest.layers_run == [LayerShape(4, 14, 0), LayerShape(4, 13, 0)]  # 9 live slots in the longer row


def test_plan_errors_name_the_problem():
    d = lively()
    x = torch.randn(2, 6, d.cfg.d_model)
    with pytest.raises(ValueError, match="expected \\(2, 6\\)"):
        d(inputs_embeds=x, plan=Drop(1, torch.ones(2, 5, dtype=torch.bool)))
    uneven = torch.ones(2, 6, dtype=torch.bool)
    uneven[0, 1] = False
    with pytest.raises(ValueError, match="same number of new tokens in every row"):
        d(inputs_embeds=x, plan=Drop(1, uneven))


# ------------------------------------------------------------------------------------------------
# caches
# ------------------------------------------------------------------------------------------------
def step_logits(denoiser, B: int = 2, step: int = 0, block: int = 0, blk: slice = slice(0, L)) -> torch.Tensor:
    canvas = torch.full((B, L), MASK)
    canvas[:, 1] = 42
    return denoiser.logits(StepState(canvas, step, block, blk, MASK))


def test_cache_strategies_identical_on_a_prefix_lm_with_one_block():
    """Prefix mask, one block covering the canvas: every cache is exact (same tokens, same logits)."""
    d = lively("prefix")
    E, valid, _ = prompt(d)
    cfg = SamplerConfig(gen_length=L, steps=L)
    ref = sample(FullRecompute(d, E, valid, attn_mode="prefix"), batch_size=2, config=cfg, mask_id=MASK)
    assert len(set(ref.tokens.flatten().tolist())) > 2  # a discriminating answer
    for name in CACHES:
        den = build_denoiser(name, d, E, valid, attn_mode="prefix")
        assert torch.equal(sample(den, batch_size=2, config=cfg, mask_id=MASK).tokens, ref.tokens), name
    for dual in (False, True):  # in-block steps (after the refresh) too
        bc = BlockCache(d, E, valid, dual=dual, attn_mode="prefix")
        step_logits(bc)
        torch.testing.assert_close(step_logits(bc, step=1), step_logits(PrefixCache(d, E, valid)), rtol=1e-5, atol=1e-5)


def test_block_prefix_cache_is_exact_for_a_causal_model_over_many_blocks():
    d = lively("causal")
    E, valid, _ = prompt(d)
    cfg = SamplerConfig(gen_length=L, steps=L, block_length=2)
    ref = sample(FullRecompute(d, E, valid, attn_mode="causal"), batch_size=2, config=cfg, mask_id=MASK)
    out = sample(BlockCache(d, E, valid, attn_mode="causal"), batch_size=2, config=cfg, mask_id=MASK)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("name", ["block", "dual"])
def test_block_caches_run_on_a_bidirectional_model(name):
    d = lively("bidirectional")
    E, valid, _ = prompt(d)
    counter = FlopCounter(d.cfg)
    cfg = SamplerConfig(gen_length=L, steps=L, block_length=4)
    out = sample(build_denoiser(name, d, E, valid, attn_mode="bidirectional", counter=counter), batch_size=2,
                 config=cfg, mask_id=MASK)
    assert (out.tokens != MASK).all() and out.nfe == L == counter.forwards
    # the first step of the block is the uncached forward
    full = step_logits(FullRecompute(d, E, valid))
    torch.testing.assert_close(step_logits(build_denoiser(name, d, E, valid)), full)


def test_dual_cache_rejects_causal_and_unknown_cache_names_are_listed():
    d = lively("causal")
    E, valid, _ = prompt(d)
    with pytest.raises(ValueError, match="dual cache .* not causal"):
        build_denoiser("dual", d, E, valid, attn_mode="causal")
    with pytest.raises(ValueError, match="Unknown cache 'kv'; known: block, dual, none, prefix"):
        build_denoiser("kv", d, E, valid)


# ------------------------------------------------------------------------------------------------
# pruning and skipping strategies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["none", "prefix", "block", "dual"])
def test_keep_ratio_one_and_skip_off_are_exact_noops(cache):
    d = lively("prefix")
    E, valid, media = prompt(d)
    cfg = SamplerConfig(gen_length=L, steps=L, block_length=4)
    ref = sample(build_denoiser(cache, d, E, valid, attn_mode="prefix"), batch_size=2, config=cfg, mask_id=MASK)
    for pc in [PruningConfig(prune="fastv", keep_ratio=1.0, prune_layer=1),
               PruningConfig(prune="divprune", keep_ratio=1.0, prune_layer=1),
               PruningConfig(skip_layers=(1,), skip_from_step=L)]:  # skipping starts after the last step
        planner = LayerPlanner(pc, prompt_embeds=E, media=media, n_layers=2, total_steps=L)
        out = sample(build_denoiser(cache, d, E, valid, attn_mode="prefix", planner=planner), batch_size=2,
                     config=cfg, mask_id=MASK)
        assert torch.equal(out.tokens, ref.tokens), pc
    # a plan that prunes at ratio 1 (probe and all) still leaves the logits bitwise equal
    fastv = LayerPlanner(PruningConfig(prune="fastv", keep_ratio=0.5, prune_layer=1), prompt_embeds=E, media=media,
                         n_layers=2, total_steps=L).pruner
    plan = StepPlan(pruner=fastv, ratio=1.0, prune_layer=1, skip=frozenset(), media=media, n_positions=P,
                    queries=torch.ones(2, P))
    assert torch.equal(d(inputs_embeds=E, plan=plan).logits, d(inputs_embeds=E).logits)


@pytest.mark.parametrize("method", ["fastv", "divprune", "vtw"])
def test_pruning_drops_the_chosen_share_of_image_rows(method):
    d = lively("prefix")
    E, valid, media = prompt(d)
    pc = PruningConfig(prune=method, keep_ratio=0.5, prune_layer=1)
    planner = LayerPlanner(pc, prompt_embeds=E, media=media, n_layers=2, total_steps=L)
    counter = FlopCounter(d.cfg)
    den = FullRecompute(d, E, valid, attn_mode="prefix", planner=planner, counter=counter)
    step_logits(den)
    n_img = MEDIA.stop - MEDIA.start
    kept = 0 if method == "vtw" else n_img // 2
    assert counter.flops < forward_flops(d.cfg, d(inputs_embeds=torch.cat([E, d.embed(torch.zeros(2, L).long())], 1)))
    plan = planner.plan(0, n_cached=0, queries=torch.ones(2, P + L))
    out = d(inputs_embeds=torch.cat([E, d.embed(torch.zeros(2, L).long())], 1), attn_mode="prefix", prefix_len=P,
            plan=plan)
    assert out.layers_run[1].rows == P + L - (n_img - kept)


def test_fastv_keeps_the_most_attended_image_tokens():
    media = torch.tensor([[False, True, True, True, True, False]])
    received = torch.tensor([[0.5, 0.1, 0.4, 0.05, 0.3, 0.2]])
    assert keep_mask(received, media, 0.5).tolist() == [[True, False, True, False, True, True]]
    # rows drop the same number: the row with fewer image tokens sets it
    media2 = torch.tensor([[True, True, True, True], [True, True, False, False]])
    k = keep_mask(torch.rand(2, 4), media2, 0.5)
    assert (~k).sum(-1).tolist() == [1, 1]


def test_divprune_order_is_greedy_max_min():
    f = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # duplicates have nearest-neighbour distance 0: a distinct token goes first, the copy last
    assert divprune_order(f).tolist() == [2, 0, 3, 1]


def test_prune_schedules_late_and_progressive():
    d = lively()
    E, _, media = prompt(d)

    def ratios(**kw):
        pl = LayerPlanner(PruningConfig(prune="fastv", keep_ratio=0.25, prune_layer=1, **kw), prompt_embeds=E,
                          media=media, n_layers=2, total_steps=8)
        return [pl.keep_ratio(s) for s in range(8)]

    assert ratios() == [0.25] * 8
    assert ratios(prune_from_step=5) == [1.0] * 5 + [0.25] * 3
    prog = ratios(prune_schedule="progressive", prune_from_step=2)
    assert prog[:2] == [1.0, 1.0] and prog[-1] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(prog[2:], prog[3:]))
    assert ratios(prune_until_step=3) == [0.25] * 3 + [1.0] * 5  # early-step pruning: the tokens come back
    early = ratios(prune_schedule="progressive", prune_until_step=4)
    assert early[3] == pytest.approx(0.25) and early[4:] == [1.0] * 4 and all(a > b for a, b in zip(early, early[1:4]))
    with pytest.raises(ValueError, match="prune_until_step 2 must be after prune_from_step 2"):
        PruningConfig(prune="fastv", keep_ratio=0.5, prune_from_step=2, prune_until_step=2)
    pl = LayerPlanner(PruningConfig(prune="fastv", keep_ratio=0.5, prune_layer=1, prune_from_step=3), prompt_embeds=E,
                      media=media, n_layers=2, total_steps=8)
    assert pl.plan(2, n_cached=0, queries=torch.ones(2, 4)) is None and pl.plan(3, n_cached=0, queries=torch.ones(2, 4))


def test_layer_skip_from_step():
    d = lively("prefix")
    E, valid, media = prompt(d)
    pl = LayerPlanner(PruningConfig(skip_layers=(1,), skip_from_step=4), prompt_embeds=E, media=media, n_layers=2,
                      total_steps=L)
    counter = FlopCounter(d.cfg)
    den = PrefixCache(d, E, valid, planner=pl, counter=counter)
    out = sample(den, batch_size=2, config=SamplerConfig(gen_length=L, steps=L), mask_id=MASK)
    assert (out.tokens != MASK).all()
    plan = pl.plan(4, n_cached=P, queries=torch.ones(2, L))
    assert pl.plan(3, n_cached=P, queries=torch.ones(2, L)) is None and plan.skip(1) and not plan.skip(0)
    assert d(torch.zeros(2, L).long(), plan=plan).layers_run[1] is None


def test_bad_pruning_configs_have_clear_messages():
    with pytest.raises(ValueError, match="Unknown token pruning method 'topk'; known: divprune, fastv, vtw"):
        PruningConfig(prune="topk")
    with pytest.raises(ValueError, match="keep_ratio must be in \\[0, 1\\]"):
        PruningConfig(prune="fastv", keep_ratio=1.5)
    with pytest.raises(ValueError, match="prune_layer must be >= 1"):
        PruningConfig(prune="fastv", prune_layer=0)
    with pytest.raises(ValueError, match="skip_layers skips"):
        PruningConfig(prune="fastv", prune_layer=2, skip_layers=(1,))
    d = lively()
    E, _, media = prompt(d)
    with pytest.raises(ValueError, match="layer index 5 out of range for a decoder of 2 layers"):
        LayerPlanner(PruningConfig(skip_layers=(5,)), prompt_embeds=E, media=media, n_layers=2, total_steps=4)
    with pytest.raises(ValueError, match="layer index 2 out of range for a decoder of 2 layers"):
        LayerPlanner(PruningConfig(prune="divprune", keep_ratio=0.5, skip_layers=(1,)), prompt_embeds=E, media=media,
                     n_layers=2, total_steps=4)


@pytest.mark.parametrize("config", [PruningConfig(skip_layers=(1,)),
                                    PruningConfig(prune="divprune", keep_ratio=1.0, skip_layers=(1,))],
                         ids=["prune-none", "keep-ratio-1"])
def test_unused_prune_layer_is_not_range_checked(config):
    """The default prune_layer 2 is out of range for a 2-layer decoder; it only matters when tokens
    are pruned (reported: --skip-layers 1 alone failed with "layer index 2 out of range")."""
    d = lively()
    E, _, media = prompt(d)
    assert config.active and not config.prunes and config.prune_layer == 2
    planner = LayerPlanner(config, prompt_embeds=E, media=media, n_layers=2, total_steps=4)
    plan = planner.plan(0, n_cached=0, queries=torch.ones(2, L))
    assert planner.pruner is None and plan.skip(1) and plan.keep(2, None) is None


def test_flags_build_the_pruning_config():
    p = argparse.ArgumentParser()
    add_decode_arguments(p)
    args = p.parse_args(["--cache", "dual", "--prune", "fastv", "--keep-ratio", "0.25", "--prune-layer", "2",
                         "--skip-layers", "3,4", "--skip-from-step", "5", "--prune-schedule", "progressive"])
    assert decode_config_from_args(args).cache == "dual"
    assert decode_config_from_args(args).pruning == PruningConfig(prune="fastv", keep_ratio=0.25, prune_layer=2,
                                                           prune_schedule="progressive", skip_layers=(3, 4),
                                                           skip_from_step=5)
    assert not decode_config_from_args(p.parse_args([])).pruning.active
    with pytest.raises(SystemExit):
        p.parse_args(["--skip-layers", "three"])


# ------------------------------------------------------------------------------------------------
# FLOP counter
# ------------------------------------------------------------------------------------------------
def test_flop_counter_matches_a_hand_count():
    """tiny-test: D=32, H=4 heads of d=8, H_kv=2, F=64, V=128, 2 layers."""
    d = lively()
    # 5 tokens, no cache. Per layer: q 2*5*32*32=10240, k and v 2*5*32*16=5120 each, o 10240,
    # QK^T and AV 2*4*5*5*8=1600 each, MLP 3*2*5*32*64=61440 -> 95360. Head 2*5*32*128=40960.
    out = d(torch.randint(3, 128, (1, 5)), store_cache=True)
    assert forward_flops(d.cfg, out) == 2 * 95360 + 40960
    # 3 new tokens against 5 cached: projections 2*3*32*96=18432, QK^T and AV 2*4*3*8*8=1536 each,
    # MLP 3*2*3*32*64=36864 -> 58368 per layer; head 2*3*32*128=24576
    counter = FlopCounter(d.cfg)
    counter.add(d(torch.randint(3, 128, (1, 3)), cache=out.cache))
    assert counter.flops == 2 * 58368 + 24576
    # 2 of 5 tokens dropped before layer 1, with FastV's probe of 1 query at layer 0 (2*4*1*5*8=320):
    # layer 1 runs 3 rows over 3 keys: 18432 + 2*(2*4*3*3*8) + 36864 = 56448; the head keeps 5 rows
    q = torch.tensor([[0.0, 0, 0, 0, 1]])
    pruned = d(torch.randint(3, 128, (1, 5)), plan=Drop(1, drop_positions(1, 5, [1, 2]), probe_at=0, queries=q))
    assert forward_flops(d.cfg, pruned) == (95360 + 320) + 56448 + 40960
    # a skipped layer costs nothing
    skipped = d(torch.randint(3, 128, (1, 5)), plan=SkipFirst())
    assert forward_flops(d.cfg, skipped) == 95360 + 40960


class SkipFirst(LayerPlan):
    def skip(self, layer: int) -> bool:
        return layer == 0


def test_flop_counter_watches_the_ar_baseline():
    d = lively("causal")
    E, valid, _ = prompt(d, B=1)
    counter = FlopCounter(d.cfg)
    with counter.watch(d):
        out = ar_generate(d, E, valid, max_new_tokens=4, eos_id=1, pad_id=2)
    assert counter.forwards == out.nfe
    per_token = 2 * (2 * 1 * 32 * 96 + 3 * 2 * 1 * 32 * 64) + 2 * 32 * 128  # projections, MLP, head of one row
    attention = sum(2 * 2 * (2 * 4 * 1 * (P + i) * 8) for i in range(1, out.nfe))  # 1 query over P+i keys, 2 layers
    prompt_pass = forward_flops(d.cfg, d(inputs_embeds=E, attn_mode="causal"))
    assert counter.flops == prompt_pass + (out.nfe - 1) * per_token + attention


# ------------------------------------------------------------------------------------------------
# the multimodal model: media positions, composition through generate
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mm_model(tiny_tokenizer):
    from mmdiff import decoder
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.encoders import vision
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer), attn_mode="prefix")
    vis = vision.preset("tiny-test")
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="linear", in_dim=vis.embed_dim, out_dim=dec.d_model))
    torch.manual_seed(0)
    return MultimodalDiffusionLM(cfg, tiny_tokenizer).eval()


def image(colour=(200, 30, 30)):
    from PIL import Image

    return Image.new("RGB", (32, 32), colour)


def test_embed_prompt_kinds_mark_the_image_tokens(mm_model):
    from mmdiff.model import IMAGE

    m = mm_model
    img = m.encode_image([image()])[0]  # (N, D)
    prompts = [m.format_prompt("how many?", n_images=1), m.format_prompt("where is the blue square?")]
    embeds, valid, kinds = m.embed_prompt(prompts, images=[[img], []], return_kinds=True)
    mask = kinds == IMAGE
    assert mask[0].sum() == img.shape[0] and not mask[1].any()
    torch.testing.assert_close(embeds[0][mask[0]], img)


def test_strategies_compose_in_one_run(mm_model):
    """Cache + pruning + layer skip + confident decoding, in one generate call: all masks filled."""
    m = mm_model
    cfg = SamplerConfig(gen_length=8, block_length=4, transfer="threshold", threshold=0.9)
    qs, ims = ["how many red circles are there?", "where is the blue square?"], [image(), image((0, 0, 200))]
    base = FlopCounter(m.cfg.decoder)
    ref = m.generate(qs, images=ims, decode=DecodeConfig(sampler=cfg), counter=base)
    for cache in CACHES.names():
        for pc in [PruningConfig(prune="fastv", keep_ratio=0.5, prune_layer=1, skip_layers=(1,), skip_from_step=3),
                   PruningConfig(prune="divprune", keep_ratio=0.25, prune_layer=0, prune_schedule="progressive"),
                   PruningConfig(prune="vtw", prune_layer=1, prune_from_step=2)]:
            counter = FlopCounter(m.cfg.decoder)
            res = m.generate(qs, images=ims, decode=DecodeConfig(sampler=cfg, cache=cache, pruning=pc), counter=counter)
            assert all(m.special.mask not in r.tokens for r in res), (cache, pc)
            assert counter.forwards >= res[0].nfe
    pruned = FlopCounter(m.cfg.decoder)
    m.generate(qs, images=ims, decode=DecodeConfig(sampler=SamplerConfig(gen_length=8), pruning=PruningConfig(prune="vtw", prune_layer=1)), counter=pruned)
    full = FlopCounter(m.cfg.decoder)
    m.generate(qs, images=ims, decode=DecodeConfig(sampler=SamplerConfig(gen_length=8)), counter=full)
    assert pruned.flops < full.flops and pruned.forwards == full.forwards
    # keep ratio 1 through generate: identical answers
    same = m.generate(qs, images=ims, decode=DecodeConfig(sampler=cfg, pruning=PruningConfig(prune="fastv", keep_ratio=1.0, prune_layer=1)))
    assert [r.tokens for r in same] == [r.tokens for r in ref]


def test_token_pruning_without_media_positions_is_refused(mm_model):
    m = mm_model
    embeds, valid = m.embed_prompt([m.format_prompt("yes")])
    with pytest.raises(ValueError, match="needs kinds"):
        m.sample(embeds, valid, decode=DecodeConfig(sampler=SamplerConfig(gen_length=4),
                                                    pruning=PruningConfig(prune="vtw")))


def test_benchmark_prints_one_table_on_a_tiny_model(mm_model, tmp_path, capsys, monkeypatch):
    """bench/fast_inference.py end to end on a tiny random model (diffusion and AR from the same weights)."""
    import importlib.util
    from pathlib import Path

    mm_model.save_pretrained(tmp_path / "model")
    path = Path(__file__).resolve().parents[1] / "bench" / "fast_inference.py"
    spec = importlib.util.spec_from_file_location("bench_fast_inference", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--model", str(tmp_path / "model"), "--ar-model", str(tmp_path / "model"), "--n", "1",
                    "--n-long", "1", "--gen-length", "4", "--long-length", "8", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    names = [line.split("|")[2].strip() for line in table[2:]]
    for w in ("short", "long"):
        rows = [line for line in table if line.startswith(f"| {w} |")]
        assert len(rows) >= 16
    for expected in ("vanilla", "confident 0.9", "prefix cache", "FastV keep 50% K=2", "FastV keep 25% K=2",
                     "DivPrune keep 25% K=0", "AR baseline (model)"):
        assert expected in names
    assert any(n.startswith("best combination") for n in names)
    assert sum(line.startswith("| machine |") for line in table) == 2
