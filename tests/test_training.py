"""Training on tiny configs for a few steps: every stage kind runs, checkpoints resume, replicas agree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.adapters.ctc import ctc_greedy
from mmdiff.losses import diffusion_loss, forward_mask
from mmdiff.model import MultimodalDiffusionLM
from mmdiff.training.batches import Example
from mmdiff.training.ctc_lm import fit_ctc_lm
from mmdiff.training.heads import GroundHead
from mmdiff.training.recipe import TrainConfig
from mmdiff.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, *, audio: bool = False, steps: int = 3, audio_adapter: str = "audio_semantic") -> dict:
    model = {
        "decoder": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden": 64,
                    "attn_mode": "prefix", "max_seq_len": 256},
        "vision": {"kind": "timm", "name": "vit_tiny_patch16_224", "img_size": 36, "patch_size": 12,
                   "embed_dim": 32, "depth": 1, "num_heads": 2, "layer": -1},
        "vision_adapter": {"kind": "mlp2x_gelu", "in_dim": 32, "out_dim": 32, "pool": 1, "grid": [3, 3],
                           "pos_embed": True, "norm": True},
    }
    stages = [{"name": "grounding", "kind": "cells", "steps": steps, "batch_size": 8, "train": ["vision"], "warmup": 1}]
    if audio:
        model["audio"] = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                          "num_mel_bins": 80, "max_source_positions": 400, "max_seconds": 8.0}
        model["audio_adapter"] = {"kind": audio_adapter, "in_dim": 32, "out_dim": 32, "subsample": 4}
        stages.append({"name": "asr", "kind": "asr", "steps": steps, "batch_size": 4, "train": ["audio"], "warmup": 1})
    stages += [
        {"name": "ar", "kind": "ar", "steps": steps, "batch_size": 8, "warmup": 1, "audio_fraction": 0.5,
         "save_as": str(tmp_path / "ar")},
        {"name": "diffusion", "kind": "diffusion", "steps": steps, "batch_size": 8, "warmup": 1,
         "complementary": True, "audio_fraction": 0.5, "long_fraction": 0.3},
    ]
    return {"out": str(tmp_path / "model"), "model": model, "stages": stages, "vocab_size": 300,
            "tokenizer_texts": 400, "bank_images": 40, "val_images": 8, "short_length": 8, "long_length": 64,
            "eval_every": 1000, "save_every": 2, "threads": 1, "speech_clips": 6 if audio else 0,
            "speech_val_clips": 3, "rank_weight": 1.0, "readout_weight": 1.0, "relate_weight": 1.0,
            "readout_at_response": True, "spec_augment": True}


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(cfg))
    return path


def test_committed_recipe_parses():
    cfg = TrainConfig.from_file(ROOT / "configs" / "mmdiff-tiny.json")
    assert [s.kind for s in cfg.stages][-1] == "diffusion"


def test_every_stage_runs_and_model_answers(tmp_path):
    cfg = TrainConfig.from_file(write(tmp_path, tiny_config(tmp_path)))
    Trainer(cfg, progress=False).run()
    model = MultimodalDiffusionLM.from_pretrained(tmp_path / "model")
    ar = MultimodalDiffusionLM.from_pretrained(tmp_path / "ar")  # the phase-1 checkpoint is kept
    assert not torch.equal(ar.decoder.lm_head.weight, model.decoder.lm_head.weight)
    import random

    from mmdiff.data.scenes import render, sample_scene

    img = render(sample_scene(random.Random(0), "test"))
    res = model.generate(["how many circles are there?"], images=[img])[0]
    assert res.nfe >= 1 and isinstance(res.text, str)
    log = [json.loads(l) for l in (tmp_path / "model.train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"grounding", "ar", "diffusion"}
    assert any("val_acc" in r for r in log) and any("val_cell_acc" in r for r in log)
    assert all(r["readout"] > 0 and "relate" in r for r in log if r["stage"] in ("ar", "diffusion") and "loss" in r)  # probes trained


@pytest.mark.needs_espeak
def test_speech_stages_run(tmp_path):
    cfg = TrainConfig.from_file(write(tmp_path, tiny_config(tmp_path, audio=True, steps=2)))
    Trainer(cfg, progress=False).run()
    log = [json.loads(l) for l in (tmp_path / "model.train_log.jsonl").read_text().splitlines()]
    assert any("val_asr" in r for r in log)
    assert any("spoken" in r.get("val_acc", {}) for r in log)


@pytest.mark.needs_espeak
def test_ctc_adapter_is_trained_by_the_asr_stage_and_kept(tmp_path):
    """With audio_ctc the ASR stage trains the adapter's own CTC head (saved with the model), and
    spoken questions reach the decoder as mixtures of its token embeddings."""
    cfg = tiny_config(tmp_path, audio=True, steps=2, audio_adapter="audio_ctc")
    cfg["stages"] = cfg["stages"][:2] + [dict(cfg["stages"][-1], train=["vision_adapter", "decoder"])]
    cfg.update(ctc_lm_order=3, ctc_lm_texts=60)
    trainer = Trainer(TrainConfig.from_file(write(tmp_path, cfg)), progress=False)
    before = trainer.model.audio_adapter.ctc.weight.detach().clone()
    trainer.run()
    model = MultimodalDiffusionLM.from_pretrained(tmp_path / "model")
    # the inference LM (ctc_lm.json) is fitted from the config and tokenizer alone, and saved with the model
    expected = fit_ctc_lm(model, TrainConfig.from_file(tmp_path / "recipe.json"))
    assert model.audio_adapter.lm.to_dict() == expected.to_dict() and expected.order == 3
    model.audio_adapter.train()  # training sees the soft runs, not the beam
    assert model.cfg.audio_adapter.vocab_size == model.cfg.decoder.vocab_size
    assert not torch.equal(before, model.audio_adapter.ctc.weight)
    from mmdiff.encoders.audio import AudioFeatures

    last = torch.randn(1, 5, 32)
    with torch.no_grad():
        probs, mask = model.audio_adapter(AudioFeatures(last=last, layers=[last], mask=torch.ones(1, 5, dtype=torch.bool)))
        tokens, mask2 = model.adapt_audio(AudioFeatures(last=last, layers=[last], mask=torch.ones(1, 5, dtype=torch.bool)))
    torch.testing.assert_close(tokens, probs @ model.decoder.embed_tokens.weight)
    assert torch.equal(mask, mask2)


@pytest.mark.needs_espeak
def test_speech_recipe_starts_from_a_trained_model_and_trains_only_its_speech_path(tmp_path):
    """``init`` keeps every part whose config is unchanged; a frozen pretrained Whisper encoder (its states
    cached once) feeds a new CTC adapter; the encoder is saved in float16 and loads without its source."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from mmdiff.io import load_safetensors

    base_cfg = tiny_config(tmp_path, audio=True, steps=2, audio_adapter="audio_ctc")
    base_cfg.update(ctc_lm_order=3, ctc_lm_texts=60)
    Trainer(TrainConfig.from_file(write(tmp_path, base_cfg)), progress=False).run()
    whisper = tmp_path / "whisper"
    sizes = dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=80,
                 max_source_positions=400)
    WhisperForConditionalGeneration(WhisperConfig(**sizes, decoder_layers=1, decoder_attention_heads=2,
                                                  decoder_ffn_dim=32, vocab_size=60, pad_token_id=0, bos_token_id=0,
                                                  eos_token_id=0, decoder_start_token_id=1)).half().save_pretrained(whisper)
    speech = dict(base_cfg, init=str(tmp_path / "model"), out=str(tmp_path / "speech"), fp16_parts=["audio"],
                  stages=[{"name": "asr", "kind": "asr", "steps": 3, "batch_size": 4, "train": ["audio_adapter"],
                           "warmup": 1, "save_as": str(tmp_path / "speech-asr")}], eval_every=3)
    speech["model"] = dict(base_cfg["model"], audio={**sizes, "checkpoint": str(whisper), "max_seconds": 8.0},
                           audio_adapter={"kind": "audio_ctc", "in_dim": 16, "out_dim": 32, "layers": 1, "hidden": 8,
                                          "heads": 2})
    trainer = Trainer(TrainConfig.from_file(write(tmp_path, speech)), progress=False)
    trainer.run()
    assert trainer.speech.features is not None  # computed once by the frozen encoder, kept
    base = MultimodalDiffusionLM.from_pretrained(tmp_path / "model")
    (whisper / "model.safetensors").unlink()  # the shipped model never needs its source
    model = MultimodalDiffusionLM.from_pretrained(tmp_path / "speech")
    assert model.cfg.audio.checkpoint is None and model.audio_adapter.lm.to_dict() == base.audio_adapter.lm.to_dict()
    for part in ("decoder", "vision", "vision_adapter"):
        for (name, a), b in zip(getattr(model, part).state_dict().items(), getattr(base, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name} changed"
    for out in ("speech", "speech-asr"):  # a stage's export (save_as) keeps the float16 parts too
        saved = load_safetensors(tmp_path / out / "model.safetensors")
        assert {v.dtype for k, v in saved.items() if k.startswith("audio.")} == {torch.float16}
        assert {v.dtype for k, v in saved.items() if not k.startswith("audio.")} == {torch.float32}
    log = [json.loads(l) for l in (tmp_path / "speech.train_log.jsonl").read_text().splitlines()]
    assert any("val_asr" in r for r in log)


def test_ground_loss_targets(tmp_path):
    """Focus groups (named object, second object, relation region) and object ranks become per-cell targets."""
    import random

    from mmdiff.data.questions import ask
    from mmdiff.model import IMAGE

    cfg = TrainConfig.from_file(write(tmp_path, tiny_config(tmp_path)))
    trainer = Trainer(cfg, progress=False)
    trainer._banks(cfg.stages[0])
    scene = trainer.bank.scenes[0]
    rng = random.Random(0)
    qa = next(q for q in (ask(scene, rng, "relation") for _ in range(50)) if q is not None)
    items = [Example(qa.question, qa.answers[0], qa.type, scene=0, focus=qa.focus)]
    head = GroundHead(4)
    n = 9
    kinds = torch.tensor([[0, 0] + [IMAGE] * n + [0]])
    hidden = torch.zeros(1, kinds.shape[1], 4)
    hidden[0, 2:2 + n, 0] = torch.arange(n, dtype=torch.float)  # each cell's state says which cell it is
    captured = {}
    head.focus.register_forward_hook(lambda m, i, o: captured.update(cells=i[0][..., 0].clone()))
    focus, rank = head.ground_loss([hidden] * 3, kinds, items, trainer.bank)
    assert captured["cells"].tolist() == [list(range(n))]  # image states read in reading order
    assert focus.item() > 0 and rank.item() > 0
    # a perfect probe gives (near) zero loss: build it from the targets
    with torch.no_grad():
        head.focus.weight.zero_(); head.rank.weight.zero_()
        target = torch.zeros(n, 3)
        for g, cells in enumerate(qa.focus):
            target[list(cells), g] = 1
        ranks = torch.full((n,), 6)
        for k, o in enumerate(scene.objects):
            ranks[o.cell] = k
    one_hot = torch.eye(n)
    hidden = torch.zeros(1, kinds.shape[1], n)
    hidden[0, 2:2 + n] = one_hot
    head = GroundHead(n)
    with torch.no_grad():
        head.focus.weight.copy_((target * 40 - 20).T); head.focus.bias.zero_()
        head.rank.weight.copy_(torch.nn.functional.one_hot(ranks, 7).float().T * 40); head.rank.bias.zero_()
    focus, rank = head.ground_loss([hidden] * 3, kinds, items, trainer.bank)
    assert focus.item() < 1e-6 and rank.item() < 1e-6


def test_readout_loss_targets(tmp_path):
    """The last prompt state predicts each focus group's object count and, for one-cell groups,
    the cell and its shape / colour / size (0 = empty): checked against the scene by hand."""
    import random

    import torch.nn.functional as F

    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import COLOURS, SHAPES, SIZES

    cfg = TrainConfig.from_file(write(tmp_path, tiny_config(tmp_path)))
    trainer = Trainer(cfg, progress=False)
    trainer._banks(cfg.stages[0])
    scene = trainer.bank.scenes[0]
    rng = random.Random(0)
    qa = next(q for q in (ask(scene, rng, "relation") for _ in range(200))
              if q is not None and q.question.startswith("what"))  # groups: (named object,), (neighbour,)
    count = next(q for q in (ask(scene, rng, "count") for _ in range(50)) if q is not None)
    items = [Example(qa.question, qa.answers[0], qa.type, scene=0, focus=qa.focus),
             Example(count.question, count.answers[0], count.type, scene=0, focus=count.focus),
             Example("transcribe the audio.", "x", "asr")]  # no image: no target
    head = GroundHead(3, readout=True)
    P = 5
    hidden = torch.randn(3, P + 2, 3)
    loss = head.readout_loss([hidden] * 4, P - 1, items, trainer.bank)

    def of(cell: int) -> tuple[int, int, int]:
        obj = scene.at(cell // 3, cell % 3)
        return (0, 0, 0) if obj is None else (SHAPES.index(obj.shape) + 1, COLOURS.index(obj.colour) + 1,
                                              SIZES.index(obj.size) + 1)

    (named,), (neighbour,) = qa.focus[0], qa.focus[1]
    assert qa.focus[1] == qa.focus[2]  # "directly": the region is the one neighbour cell
    targets: dict[str, list[tuple[int, int]]] = {k: [] for k in head.readout}  # key -> [(row, class)]
    for g, cell in ((0, named), (1, neighbour)):
        for k, y in zip(("shape", "colour", "size", "cell"), (*of(cell), cell)):
            targets[f"{g}_{k}"].append((0, y))
        targets[f"{g}_count"].append((0, int(of(cell)[0] > 0)))
    targets["0_count"].append((1, int(count.answers[0])))  # a count question's one group: its answer
    if len(count.focus[0]) == 1:  # one object counted: its cell's targets too
        (c,) = count.focus[0]
        for k, y in zip(("shape", "colour", "size", "cell"), (*of(c), c)):
            targets[f"0_{k}"].append((1, y))
    state = hidden[:, P - 1]
    expected = sum(F.cross_entropy(head.readout[k](state[[r for r, _ in t]]), torch.tensor([y for _, y in t]))
                   for k, t in targets.items() if t)
    torch.testing.assert_close(loss, expected / 2)


def test_resume_continues_from_checkpoint(tmp_path):
    cfg_dict = tiny_config(tmp_path, steps=4)
    cfg_dict["stages"] = cfg_dict["stages"][:2]  # grounding + ar
    cfg = TrainConfig.from_file(write(tmp_path, cfg_dict))
    t = Trainer(cfg, progress=False)
    t.run()
    state = json.loads((tmp_path / "model.train_state" / "train_state.json").read_text())
    assert {k: state[k] for k in ("stage", "step")} == {"stage": 2, "step": 0}
    again = Trainer(cfg, progress=False)  # resumes: nothing left to do, weights identical
    assert again.state["stage"] == 2
    torch.testing.assert_close(again.model.decoder.lm_head.weight, t.model.decoder.lm_head.weight)
    # another recipe with the same out (as the caption stage after the shipped recipe) never resumes this state
    other = dict(cfg_dict, stages=cfg_dict["stages"][1:2])
    with pytest.raises(ValueError, match="another recipe.*--fresh"):
        Trainer(TrainConfig.from_file(write(tmp_path, other)), progress=False)
    Trainer(TrainConfig.from_file(write(tmp_path, other)), resume=False, progress=False)  # --fresh


def test_nan_guard_stops_with_message(tmp_path):
    cfg_dict = tiny_config(tmp_path)
    cfg_dict["stages"] = [dict(cfg_dict["stages"][1], steps=3)]
    cfg = TrainConfig.from_file(write(tmp_path, cfg_dict))
    trainer = Trainer(cfg, progress=False)
    with torch.no_grad():
        trainer.model.decoder.norm.weight[0] = float("inf")  # a diverged weight
    with pytest.raises(RuntimeError, match="non-finite loss"):
        trainer.run()


def test_diffusion_loss_weighting():
    """Masked-diffusion ELBO: CE on masked tokens only, weighted by 1/t, averaged over all tokens."""
    logits = torch.zeros(1, 4, 5)
    targets = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[True, False, True, False]])
    t = torch.tensor([0.5])
    ce = torch.log(torch.tensor(5.0))
    torch.testing.assert_close(diffusion_loss(logits, targets, masked, t), 2 * ce / 0.5 / 4)
    tg, m, tt = forward_mask(torch.ones(3, 10, dtype=torch.long), generator=torch.Generator().manual_seed(0),
                             complementary=True)
    assert tg.shape == (6, 10) and torch.equal(m[:3], ~m[3:]) and torch.allclose(tt[:3] + tt[3:], torch.ones(3))


def test_ctc_greedy_decode():
    logp = torch.log(torch.tensor([[[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9], [0.9, 0.1, 0.0]]]))
    assert ctc_greedy(logp, torch.tensor([4]), blank=2) == [[1, 0]]


def test_data_parallel_replicas_identical(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): both replicas hold identical weights after training."""
    cfg_dict = tiny_config(tmp_path)
    cfg_dict["stages"] = [dict(cfg_dict["stages"][1], steps=3, save_as=None)]
    path = write(tmp_path, cfg_dict)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import os, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from mmdiff.training.recipe import TrainConfig\n"
        "from mmdiff.training.trainer import Trainer\n"
        f"cfg = TrainConfig.from_file({str(path)!r})\n"
        "t = Trainer(cfg, resume=False, progress=False)\n"
        "t.run()\n"
        "r = os.environ['RANK']\n"
        f"save_file({{k: v.contiguous() for k, v in t.model.decoder.state_dict().items()}}, {str(tmp_path)!r} + f'/rank{{r}}.safetensors')\n")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                          env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_relate_loss_targets(tmp_path):
    """The comparison readout's targets: the order (<, =, >) of the two focus groups' counts and,
    for two one-cell groups, of their rows and columns, checked against the scene by hand; and
    every image question's operator (relation word, comparison, or none)."""
    import random

    import torch.nn.functional as F

    from mmdiff.data.questions import COMPARISONS, DIRECTIONS, OPERATORS, ask

    cfg = TrainConfig.from_file(write(tmp_path, tiny_config(tmp_path)))
    trainer = Trainer(cfg, progress=False)
    trainer._banks(cfg.stages[0])
    rng = random.Random(0)
    pairs = ((i, q) for i, sc in enumerate(trainer.bank.scenes) for q in (ask(sc, rng, "relation") for _ in range(20))
             if q is not None and q.question.startswith("is the"))
    index, pair = next(pairs)  # a scene with an "is the X <relation> the Y?" question
    scene = trainer.bank.scenes[index]
    compare = ask(scene, rng, "comparison")
    count = ask(scene, rng, "count")  # one focus group: no target
    assert compare is not None and count is not None
    items = [Example(compare.question, compare.answers[0], compare.type, scene=index, focus=compare.focus),
             Example(count.question, count.answers[0], count.type, scene=index, focus=count.focus),
             Example(pair.question, pair.answers[0], pair.type, scene=index, focus=pair.focus)]
    head = GroundHead(4, relate=True)
    P = 5
    hidden = torch.randn(len(items), P + 2, 4)
    loss = head.relate_loss([hidden] * 4, P - 1, items, trainer.bank)

    occupied = {o.cell for o in scene.objects}
    n1, n2 = (sum(c in occupied for c in g) for g in compare.focus[:2])
    more = {"more": n1 > n2, "fewer": n1 < n2, "as": n1 == n2}[compare.question.split()[2]]
    assert more == (compare.answers[0] == "yes")  # the order target decides the comparison's answer
    targets = {"count": [(0, 0 if n1 < n2 else 1 if n1 == n2 else 2)], "row": [], "col": [], "op": []}
    (a,), (b,) = pair.focus[0], pair.focus[1]
    ra, ca, rb, cb = a // 3, a % 3, b // 3, b % 3
    targets["count"].append((2, 1))  # one object each
    targets["row"].append((2, 0 if ra < rb else 1 if ra == rb else 2))
    targets["col"].append((2, 0 if ca < cb else 1 if ca == cb else 2))
    rel = next(r for r in DIRECTIONS if f" {r} the " in pair.question)
    dr, dc = DIRECTIONS[rel]  # "above" is (-1, 0): a smaller row
    wanted = (targets["row"][-1][1] if dr else targets["col"][-1][1]) - 1  # -1 / 0 / +1
    assert (wanted == (dr or dc)) == (pair.answers[0] == "yes")  # the order decides the answer
    kind = {"more": "more", "fewer": "fewer", "as": "as many"}[compare.question.split()[2]]
    assert OPERATORS == (*DIRECTIONS, *COMPARISONS)
    targets["op"] = [(0, OPERATORS.index(kind)), (1, len(OPERATORS)), (2, OPERATORS.index(rel))]  # count: none
    state = hidden[:, P - 1]
    expected = sum(F.cross_entropy(head.relate[k](state[[r for r, _ in t]]), torch.tensor([y for _, y in t]))
                   for k, t in targets.items() if t)
    torch.testing.assert_close(loss, expected)


def test_cell_states_pools_a_patch_grid_to_cells():
    """A token-rich model's 6 x 6 patch states reach the cell probes as the mean of each cell's 2 x 2 patches
    (reading order); one token per cell passes unchanged; a grid that does not split into cells is refused."""
    from mmdiff.data.scenes import GRID
    from mmdiff.training.heads import cell_states

    tokens = torch.randn(2, 36, 5)
    grid = tokens.view(2, 6, 6, 5)
    want = torch.stack([grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2))
                        for r in range(GRID) for c in range(GRID)], dim=1)
    torch.testing.assert_close(cell_states(tokens), want)
    nine = torch.randn(2, GRID * GRID, 5)
    assert cell_states(nine) is nine
    with pytest.raises(ValueError, match="square patch grid"):
        cell_states(torch.randn(1, 20, 5))


def test_token_rich_recipes_parse_and_train_a_36_token_model(tmp_path):
    """The token-rich recipes of issue #24 (hybrid and diffusion-only): one image is the 6 x 6 patch grid (36
    tokens, no cell pooling) and no speech path; a tiny model of that layout trains through every stage with the
    cell probes (patches pooled to cells) and answers with 36 image tokens in its prompt."""
    for name, last in (("mmdiff-tiny-rich.json", "diffusion"), ("mmdiff-tiny-rich-diffusion-only.json", "diffusion")):
        cfg = TrainConfig.from_file(ROOT / "configs" / name)
        assert cfg.model["vision_adapter"]["pool"] == 1 and "audio" not in cfg.model and cfg.speech_clips == 0
        assert cfg.stages[-1].kind == last and all(s.kind != "asr" for s in cfg.stages)
    tiny = tiny_config(tmp_path, steps=2)
    tiny["model"]["vision"]["img_size"] = 72  # 6 x 6 patches of 12 px
    tiny["model"]["vision_adapter"]["grid"] = [6, 6]
    Trainer(TrainConfig.from_file(write(tmp_path, tiny)), progress=False).run()
    model = MultimodalDiffusionLM.from_pretrained(tmp_path / "model")
    import random

    from mmdiff.data.scenes import render, sample_scene

    image = render(sample_scene(random.Random(0), "test"))
    assert model.num_image_tokens(image) == 36 and model.image_tokens([image])[0].shape[0] == 36
    assert model.generate(["what colour is the object in the centre?"], images=[image])[0].nfe >= 1
    log = [json.loads(line) for line in (tmp_path / "model.train_log.jsonl").read_text().splitlines()]
    assert all(r["rank"] > 0 and r["readout"] > 0 for r in log if r["stage"] == "diffusion" and "loss" in r)
