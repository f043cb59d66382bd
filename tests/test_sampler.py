import itertools

import pytest
import torch

from mmdiff.decoder import Decoder, preset
from mmdiff.sampling import (
    REMASKING,
    SCHEDULES,
    TRANSFER,
    FullRecompute,
    PrefixCache,
    SamplerConfig,
    Strategy,
    iter_sample,
    num_transfer,
    sample,
)
from mmdiff.sampling.autoregressive import ar_generate

MASK, EOS, PAD = 0, 1, 2


def setup(B=2, P=5, seed=0):
    torch.manual_seed(seed)
    d = Decoder(preset("tiny-test")).eval()
    ids = torch.randint(3, 128, (B, P))
    return d, ids


def run(d, ids, valid=None, **kw):
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    cfg = SamplerConfig(**kw)
    return sample(FullRecompute(d, d.embed(ids), valid), batch_size=ids.shape[0], config=cfg, mask_id=MASK,
                  suppress_ids=(EOS, PAD))


@pytest.mark.parametrize("schedule,remasking,transfer", list(itertools.product(SCHEDULES, REMASKING, TRANSFER)))
def test_every_combination_fills_all_masks(schedule, remasking, transfer):
    d, ids = setup()
    before = ids.clone()
    out = run(d, ids, gen_length=8, steps=4, block_length=4, schedule=schedule, remasking=remasking,
              transfer=transfer, threshold=0.5, temperature=0.5)
    assert (out.tokens != MASK).all()
    assert torch.equal(ids, before)  # the prompt is never touched
    assert sum(out.fixed_per_step) == 2 * 8
    assert out.nfe == len(out.fixed_per_step)


def test_schedules_sum_to_masked_count():
    n = torch.tensor([0, 1, 7, 32])
    for name in SCHEDULES:
        k = num_transfer(n, 5, schedule=name)
        assert torch.equal(k.sum(-1), n)
    torch.testing.assert_close(num_transfer(torch.tensor([8]), 4)[0], torch.tensor([2, 2, 2, 2]))


def test_nfe_exact():
    d, ids = setup()
    assert run(d, ids, gen_length=8, steps=4).nfe == 4
    assert run(d, ids, gen_length=8, steps=8, block_length=4).nfe == 8
    assert run(d, ids, gen_length=8, steps=2, block_length=2).nfe == 4  # at least one step per block


def test_confident_decoding_threshold_one_unmasks_one_per_step():
    d, ids = setup(B=1)
    out = run(d, ids, gen_length=8, transfer="threshold", threshold=1.0)
    assert out.fixed_per_step == [1] * 8 and out.nfe == 8


def test_confident_decoding_low_threshold_is_parallel():
    d, ids = setup(B=1)
    out = run(d, ids, gen_length=8, transfer="threshold", threshold=1e-6)  # (0, 1]: every token clears it
    assert out.nfe == 1 and out.fixed_per_step == [8]


def test_batched_equals_per_sample_with_left_padding():
    d, _ = setup()
    a = torch.randint(3, 128, (1, 4))
    b = torch.randint(3, 128, (1, 7))
    batch = torch.cat([torch.cat([torch.full((1, 3), PAD), a], 1), b])
    valid = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], 1),
                       torch.ones(1, 7, dtype=torch.bool)])
    for kw in [dict(gen_length=6, steps=3), dict(gen_length=6, transfer="threshold", threshold=0.3),
               dict(gen_length=6, steps=6, block_length=3, remasking="margin")]:
        out = run(d, batch, valid, **kw)
        torch.testing.assert_close(out.tokens[0], run(d, a, **kw).tokens[0])
        torch.testing.assert_close(out.tokens[1], run(d, b, **kw).tokens[0])


def test_seeded_sampling_is_reproducible():
    d, ids = setup()
    kw = dict(gen_length=8, steps=4, temperature=1.0, remasking="random", seed=7)
    assert torch.equal(run(d, ids, **kw).tokens, run(d, ids, **kw).tokens)


def test_suppress_eos_never_emits_eos():
    d, ids = setup()
    with torch.no_grad():
        d.lm_head.weight[EOS] += 5.0  # make EOS the favourite
    assert (run(d, ids, gen_length=8).tokens == EOS).any()
    assert not (run(d, ids, gen_length=8, suppress_eos=True).tokens == EOS).any()


def test_iterator_yields_every_step_and_strategy_hooks_run():
    class Fix(Strategy):
        def init_canvas(self, canvas, mask_id):
            canvas = canvas.clone()
            canvas[:, 0] = 42
            return canvas

    d, ids = setup()
    events = list(iter_sample(FullRecompute(d, d.embed(ids), torch.ones_like(ids, dtype=torch.bool)), batch_size=2,
                              config=SamplerConfig(gen_length=6, steps=5), mask_id=MASK, strategies=[Fix()]))
    out = events[-1]
    assert len(events) - 1 == out.nfe == 5
    assert (out.tokens[:, 0] == 42).all() and (out.fixed_at[:, 0] == -1).all()
    for e in events[:-1]:
        assert (e.canvas[:, 0] == 42).all()


def test_prefix_cache_identical_to_recompute():
    d, ids = setup()
    valid = torch.ones_like(ids, dtype=torch.bool)
    cfg = SamplerConfig(gen_length=8, steps=4)
    a = sample(FullRecompute(d, d.embed(ids), valid, attn_mode="prefix"), batch_size=2, config=cfg, mask_id=MASK)
    b = sample(PrefixCache(d, d.embed(ids), valid), batch_size=2, config=cfg, mask_id=MASK)
    assert torch.equal(a.tokens, b.tokens)


def test_ar_generate_matches_unrolled_argmax():
    d, ids = setup(B=1)
    out = ar_generate(d, d.embed(ids), torch.ones_like(ids, dtype=torch.bool), max_new_tokens=5, eos_id=EOS, pad_id=PAD)
    seq = ids.clone()
    for _ in range(5):
        nxt = d(seq, attn_mode="causal").logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        if nxt.item() == EOS:
            break
    n = seq.shape[1] - ids.shape[1]
    assert torch.equal(out.tokens[0, :n], seq[0, ids.shape[1]:])


def test_bad_sampler_config_messages():
    with pytest.raises(ValueError, match="Unknown schedule"):
        SamplerConfig(schedule="exp")
    with pytest.raises(ValueError, match="gen_length"):
        SamplerConfig(gen_length=0)
