"""CTC decoding of the audio_ctc adapter: the token n-gram LM and the prefix beam search, against
exhaustive references."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from mmdiff.adapters import CTCAdapterConfig, build_adapter
from mmdiff.adapters.ctc import EOS, TokenNGram, ctc_greedy, ctc_prefix_beam_search
from mmdiff.encoders.audio import AudioFeatures
from mmdiff.sampling import DecodeConfig

SENTENCES = [[0, 1, 2], [0, 1, 1, 2], [0, 2], [1, 2, 2], [0, 1, 2]]


def test_ngram_is_a_distribution_for_every_history():
    """sum_w P(w | h) over the vocabulary and EOS is 1, for seen, partly seen and unseen histories."""
    V = 4
    lm = TokenNGram.fit(SENTENCES, order=3, vocab_size=V)
    for hist in [lm.history([]), lm.history([0]), lm.history([0, 1]), lm.history([2, 0]), (3, 3)]:
        total = sum(math.exp(lm.logp(hist, w)) for w in [*range(V), EOS])
        assert total == pytest.approx(1.0, abs=1e-9), hist
    # seen continuations beat unseen ones, and the corpus' commonest sentence beats a shuffled one
    assert lm.logp(lm.history([0]), 1) > lm.logp(lm.history([0]), 3)
    assert lm.score([0, 1, 2]) > lm.score([2, 1, 0])


def test_ngram_counts_by_hand():
    """Order 2, D = 0.5: P(1 | 0) = (2 - 0.5) / 3 + 0.5 * 2 / 3 * P_unigram(1)."""
    lm = TokenNGram.fit([[0, 1], [0, 1], [0, 2]], order=2, vocab_size=3, discount=0.5)
    # unigram level: 9 events (0 x3, 1 x2, 2, EOS x3), 4 distinct; floor 1 / (3 + 1)
    p_uni = (2 - 0.5) / 9 + 0.5 * 4 / 9 * 0.25
    assert math.exp(lm.logp((0,), 1)) == pytest.approx((2 - 0.5) / 3 + 0.5 * 2 / 3 * p_uni)


def test_ngram_save_load_round_trip_and_errors(tmp_path):
    lm = TokenNGram.fit(SENTENCES, order=3, vocab_size=4)
    lm.save(tmp_path / "lm.json")
    back = TokenNGram.load(tmp_path / "lm.json")
    assert back.to_dict() == lm.to_dict()
    assert back.logp((0, 1), 2) == lm.logp((0, 1), 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        TokenNGram.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"order": 2}))
    with pytest.raises(ValueError, match="other.json: not a TokenNGram file"):
        TokenNGram.load(tmp_path / "other.json")


def exhaustive(logp: torch.Tensor, blank: int, lm: TokenNGram | None, alpha: float, beta: float) -> list[int]:
    """argmax over label sequences l of log sum_{paths -> l} P(path) + alpha log P_LM(l, EOS) + beta |l|,
    by enumerating every frame-level path."""
    T, C = logp.shape
    total: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(C), repeat=T):
        lp = sum(logp[t, c].item() for t, c in enumerate(path))
        label = tuple(c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1]))
        total[label] = float(torch.logaddexp(torch.tensor(total.get(label, -math.inf)), torch.tensor(lp)))

    def score(label):
        return total[label] + (alpha * lm.score(list(label)) if lm is not None else 0.0) + beta * len(label)

    return list(max(total, key=score))


@pytest.mark.parametrize("seed", range(4))
def test_prefix_beam_search_equals_exhaustive_search(seed):
    """With a beam wide enough to keep every prefix, the beam's answer is the exact argmax (with and
    without the LM); without the LM and beta it also never scores below best path."""
    g = torch.Generator().manual_seed(seed)
    T, V = 5, 3
    blank = V
    logp = (torch.randn(T, V + 1, generator=g) * 2).log_softmax(-1)
    lm = TokenNGram.fit(SENTENCES, order=2, vocab_size=V)
    wide = dict(beam_width=10_000, top_k=V, min_logp=-math.inf)
    assert ctc_prefix_beam_search(logp, blank, None, length_bonus=0.0, **wide) == exhaustive(logp, blank, None, 0.0, 0.0)
    assert (ctc_prefix_beam_search(logp, blank, lm, lm_weight=0.7, length_bonus=0.3, **wide)
            == exhaustive(logp, blank, lm, 0.7, 0.3))


def test_beam_search_repeats_need_a_blank_between():
    """Frames a, a, blank, a give "a a" (two tokens); a, a, a give "a"."""
    blank = 2
    frames = lambda labels: torch.nn.functional.one_hot(torch.tensor(labels), 3).float().mul(30).log_softmax(-1)
    assert ctc_prefix_beam_search(frames([0, 0, blank, 0]), blank, length_bonus=0.0) == [0, 0]
    assert ctc_prefix_beam_search(frames([0, 0, 0]), blank, length_bonus=0.0) == [0]
    assert ctc_greedy(frames([0, 0, blank, 0])[None], torch.tensor([4]), blank) == [[0, 0]]


def test_adapter_decodes_with_the_lm_in_eval_mode_only():
    """Eval mode with an LM: one-hot rows of the beam transcript; the LM turns an ambiguous frame into
    the word the questions use. Train mode (or beam_width 0): the soft runs, as without an LM."""
    V = 4
    adapter = build_adapter(CTCAdapterConfig(kind="audio_ctc", in_dim=V + 1, out_dim=8, vocab_size=V))
    with torch.no_grad():
        adapter.ctc.weight.copy_(torch.eye(V + 1))
        adapter.ctc.bias.zero_()
    blank = V
    # frame 0: token 0; frame 1: token 1 or 3, slightly favouring 3; frame 2: token 2
    x = torch.full((3, V + 1), -9.0)
    x[0, 0] = x[2, 2] = 0.0
    x[1, 3], x[1, 1] = 0.0, -0.2
    feats = AudioFeatures(last=x[None], layers=[x[None]], mask=torch.ones(1, 3, dtype=torch.bool))
    adapter.eval()
    soft, _ = adapter(feats)
    assert soft[0].argmax(-1).tolist() == [0, 3, 2]  # no LM: best path
    adapter.lm = TokenNGram.fit([[0, 1, 2]] * 5, order=3, vocab_size=V)
    assert adapter.uses_beam and adapter.transcribe_ids(feats) == [[0, 1, 2]]
    tokens, mask = adapter(feats)
    assert torch.equal(tokens[0], torch.eye(V)[[0, 1, 2]]) and mask.all()
    adapter.train()
    assert torch.equal(adapter(feats)[0], soft)
    adapter.eval()
    adapter.cfg.beam_width = 0
    assert torch.equal(adapter(feats)[0], soft) and adapter.transcribe_ids(feats) == [[0, 3, 2]]
    assert blank == adapter.blank


@pytest.fixture
def ctc_model(tiny_tokenizer):
    """A random vision + audio_ctc model."""
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    V = len(tiny_tokenizer)
    cfg = ModelConfig.from_dict({
        "model_type": "mmdiff",
        "decoder": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "mlp_hidden": 64, "vocab_size": V,
                    "max_seq_len": 256},
        "vision": {"kind": "timm", "name": "vit_tiny_patch16_224", "img_size": 36, "patch_size": 12,
                   "embed_dim": 32, "depth": 1, "num_heads": 2, "layer": -1},
        "vision_adapter": {"kind": "linear", "in_dim": 32, "out_dim": 32},
        "audio": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                  "num_mel_bins": 80, "max_source_positions": 400, "max_seconds": 8.0},
        "audio_adapter": {"kind": "audio_ctc", "in_dim": 32, "out_dim": 32}})
    torch.manual_seed(0)
    return MultimodalDiffusionLM(cfg, tiny_tokenizer).eval()


def test_model_directory_keeps_the_lm(tmp_path, ctc_model):
    """save_pretrained writes ctc_lm.json; from_pretrained attaches it; an LM of another vocabulary is refused."""
    from mmdiff.model import MultimodalDiffusionLM

    V = ctc_model.cfg.decoder.vocab_size
    ctc_model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "ctc_lm.json").exists()
    assert MultimodalDiffusionLM.from_pretrained(tmp_path / "plain").audio_adapter.lm is None
    ctc_model.audio_adapter.lm = TokenNGram.fit(SENTENCES, order=3, vocab_size=V)
    ctc_model.save_pretrained(tmp_path / "lm")
    back = MultimodalDiffusionLM.from_pretrained(tmp_path / "lm")
    assert back.audio_adapter.lm.to_dict() == ctc_model.audio_adapter.lm.to_dict() and back.audio_adapter.uses_beam
    TokenNGram.fit(SENTENCES, order=3, vocab_size=V + 5).save(tmp_path / "lm" / "ctc_lm.json")
    with pytest.raises(ValueError, match=rf"ctc_lm.json: LM vocabulary {V + 5} != the model.s {V} \(it belongs to another model\)"):
        MultimodalDiffusionLM.from_pretrained(tmp_path / "lm")


def test_ask_speech_flags_reach_the_adapter(tmp_path, ctc_model, capsys):
    """``mmdiff ask --audio``: by default the saved LM beam, ``--asr-beam 0`` the soft runs; each answer
    equals ``generate`` with the adapter set the same way. A model without audio refuses the flags."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from mmdiff import cli
    from mmdiff.sampling import SamplerConfig

    tokenizer = ctc_model.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["how many red circles are there?"] * 3]
    ctc_model.audio_adapter.lm = TokenNGram.fit(ids, order=3, vocab_size=ctc_model.cfg.decoder.vocab_size)
    ctc_model.save_pretrained(tmp_path)
    t = np.arange(16000) / 16000
    sf.write(tmp_path / "q.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32), 16000)
    Image.new("RGB", (36, 36), (200, 30, 30)).save(tmp_path / "scene.png")
    run = lambda *flags: (cli.main(["ask", "--image", str(tmp_path / "scene.png"), "--audio", str(tmp_path / "q.wav"),
                                    "--model", str(tmp_path), "--json", *flags]), json.loads(capsys.readouterr().out))
    expect = lambda: ctc_model.generate([""], images=[tmp_path / "scene.png"], audios=[tmp_path / "q.wav"], decode=DecodeConfig(sampler=SamplerConfig(gen_length=8)))[0].text
    rc, beam = run()
    assert rc == 0 and beam["answer"] == expect()
    feats, mask = ctc_model.audio.preprocess([str(tmp_path / "q.wav")])
    assert beam["heard"] == tokenizer.decode(ctc_model.audio_adapter.transcribe_ids(ctc_model.audio(feats, mask))[0])
    ctc_model.audio_adapter.cfg.beam_width = 0
    rc, soft = run("--asr-beam", "0")
    assert rc == 0 and soft["answer"] == expect()
    plain = tmp_path / "no-audio"
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    MultimodalDiffusionLM(ModelConfig(decoder=ctc_model.cfg.decoder, vision=ctc_model.cfg.vision,
                                      vision_adapter=ctc_model.cfg.vision_adapter), tokenizer).save_pretrained(plain)
    assert cli.main(["ask", "hi", "--image", str(tmp_path / "scene.png"), "--model", str(plain), "--asr-beam", "4"]) == 2
    assert "--asr-* flags need a model with an audio adapter" in capsys.readouterr().err


@pytest.mark.needs_espeak
@pytest.mark.parametrize("voices", ["train", "unheard", "accents"])
def test_lm_sweep_bench_prints_one_row_per_setting(tmp_path, ctc_model, capsys, voices):
    """bench/ctc_lm_sweep.py speaks real validation clips (training voices, or unheard variants of the training
    accents) and decodes them once per (alpha, beta)."""
    import importlib.util
    from pathlib import Path

    tokenizer = ctc_model.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["is there a red circle?", "where is the square?"]]
    ctc_model.audio_adapter.lm = TokenNGram.fit(ids, order=3, vocab_size=ctc_model.cfg.decoder.vocab_size)
    ctc_model.save_pretrained(tmp_path)
    path = Path(__file__).resolve().parents[1] / "bench" / "ctc_lm_sweep.py"
    spec = importlib.util.spec_from_file_location("bench_ctc_lm_sweep", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tmp_path), "--clips", "2", "--alphas", "0", "0.3", "--betas", "1.5",
                       "--voices", voices]) == 0
    out = capsys.readouterr().out
    assert ("unheard variants of the training accents" in out) == (voices == "unheard")
    assert ("20 synthetic accents" in out) == (voices == "accents")
    rows = [l for l in out.splitlines() if l.startswith("| 0")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| 0", "1.5"], ["| 0.3", "1.5"]]
    assert sum("(best)" in r for r in rows) == 1


def test_lm_sweep_bench_refuses_unknown_voices(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "ctc_lm_sweep.py"
    spec = importlib.util.spec_from_file_location("bench_ctc_lm_sweep", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--voices", "flite"])
    assert e.value.code == 2 and "--voices: invalid choice: 'flite'" in capsys.readouterr().err
