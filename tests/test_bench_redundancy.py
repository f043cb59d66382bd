"""bench/redundancy.py on a tiny random prefix-LM model: its table's columns, the FLOPs pruning and
layer skipping save, the Wilson interval, the JSON report and bad --models items."""
import json

import pytest
import torch
from conftest import load_bench


@pytest.fixture
def bench(monkeypatch):
    return load_bench("redundancy", monkeypatch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random image-question model with the prefix mask (its exact cache is ``prefix``)."""
    from mmdiff import decoder
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.encoders import vision
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer), attn_mode="prefix")
    vis = vision.preset("tiny-test")
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="linear", in_dim=vis.embed_dim, out_dim=dec.d_model))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("redundancy") / "m"
    MultimodalDiffusionLM(cfg, tiny_tokenizer).save_pretrained(path)
    return path


def test_study_table_columns_and_flops(bench, model_dir):
    from PIL import Image

    from mmdiff import load

    model = load(model_dir, dtype="float32", device="cpu")
    examples = [bench.Example(Image.new("RGB", (32, 32), c), q, [a]) for c, q, a in
                [((200, 30, 30), "how many red circles are there?", "1"),
                 ((0, 0, 200), "where is the blue square?", "top left"), ((30, 200, 30), "yes", "no")]]
    n_layers = model.cfg.decoder.n_layers
    settings = bench.study_settings(4, n_layers, ratios=(0.5,), vtw_layers=(1,), skip=(n_layers - 1,))
    families = ["baseline"] + ["FastV"] * 4 + ["DivPrune"] * 4 + ["VTW"] * 3 + ["layer skip"] * 2
    assert [s.family for s in settings] == families
    rows = bench.study(model, examples, length=4, settings=settings, repeats=1)
    assert len(rows) == 2 * len(settings) and [r["cache"] for r in rows] == ["none"] * 14 + ["prefix"] * 14
    table = bench.format_table(rows).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == list(bench.COLUMNS)
    assert len(table) == 2 + len(rows)
    for cache in ("none", "prefix"):
        mine = [r for r in rows if r["cache"] == cache]
        base = mine[0]
        assert base["setting"] == "unpruned" and base["flops_cut"] == 0 and base["delta_points"] == 0
        assert base["changed"] == 0 and base["ci95"][0] <= base["accuracy"] <= base["ci95"][1]
        skipped = [r for r in mine if r["method"] == "layer skip"]
        assert all(r["flops_cut"] > 0 for r in skipped)  # layer skipping saves FLOPs with and without the cache
    plain = {r["setting"]: r for r in rows if r["cache"] == "none"}
    for name in ("keep 50% K=0, step 0", "K=1, step 0"):  # DivPrune, VTW from step 0: image tokens dropped
        assert plain[name]["gflop"] < plain["unpruned"]["gflop"] and plain[name]["flops_cut"] > 0
    assert plain["keep 50% K=0, step 0"]["flops_cut"] > plain["keep 50% K=0, late (from step 2)"]["flops_cut"] > 0
    assert plain["keep 50% K=0, step 0"]["flops_cut"] > plain["keep 50% K=0, early (until step 2)"]["flops_cut"] > 0
    cached = {r["setting"]: r for r in rows if r["cache"] == "prefix"}
    # with the prefix cache, pruned cached image keys leave the key tensor: only later attention is saved
    for name in ("keep 50% K=0, step 0", "K=1, step 0"):
        assert 0 < cached[name]["flops_cut"] < plain[name]["flops_cut"]


def test_the_split_step_moves_late_and_early(bench):
    names = [s.name for s in bench.study_settings(8, 6, ratios=(0.5,), vtw_layers=(3,), skip=(), split=6)]
    assert "keep 50% K=0, early (until step 6)" in names and "K=3, late (from step 6)" in names
    with pytest.raises(ValueError, match="inside the 8 steps, got 8"):
        bench.study_settings(8, 6, ratios=(0.5,), vtw_layers=(3,), skip=(), split=8)


def test_decode_order_counts_every_answer(bench, model_dir, capsys):
    assert bench.main(["--models", f"tiny={model_dir}", "--n", "3", "--n-long", "1", "--gen-length", "4",
                       "--long-length", "8", "--decode-order"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| tiny")]
    assert [r.split("|")[2].strip() for r in rows] == ["short", "long"]
    model = bench.common.load_model(bench.build_parser().parse_args([]), str(model_dir))
    ex = bench.common.test_split(3, 0, 0)["short"]
    o = bench.decode_order(model, ex, length=4, steps=4, split=2)
    assert sum(o["first"].values()) == sum(o["last"].values()) <= 3 and 0 <= o["after_split"] <= 1
    assert all(0 <= k < 4 for k in (*o["first"], *o["last"]))


def test_fields_right_is_graded(bench):
    truth = json.dumps([{"shape": "circle", "color": "red", "size": "large", "position": "top left"}])
    ex = bench.Example(None, "describe the image in json.", [truth])
    half = json.dumps([{"shape": "circle", "color": "blue", "size": "large", "position": "top left"}])
    assert bench.fields_right([truth], [ex]) == 1.0 and bench.fields_right(["not json"], [ex]) == 0.0
    assert bench.fields_right([half], [ex]) == 0.75  # objects matched by position, one field of four wrong
    assert bench.fields_right(["1"], [bench.Example(None, "how many?", ["1"])]) is None


def test_wilson_interval(bench):
    lo, hi = bench.wilson(285, 300)
    assert lo == pytest.approx(0.9192, abs=1e-4) and hi == pytest.approx(0.9695, abs=1e-4)
    assert bench.wilson(0, 30)[0] == 0.0 and bench.wilson(30, 30)[1] == 1.0 and 0 < bench.wilson(0, 30)[1] < 0.12


def test_main_writes_every_number(bench, model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--models", f"tiny={model_dir}", "--n", "2", "--n-long", "1", "--gen-length", "4",
                       "--long-length", "8", "--ratios", "0.5", "--skip", "none", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### tiny (") == 2 and printed.count("| cache | method |") == 2
    report = json.loads(out.read_text())
    short = report["models"][0]["workloads"]["short"]
    assert short["n"] == 2 and short["visual_tokens"] > 0 and short["prompt_tokens"] > short["visual_tokens"]
    assert {r["method"] for r in short["rows"]} == {"baseline", "FastV", "DivPrune", "VTW"}
    long = report["models"][0]["workloads"]["long"]
    assert long["canvas"] == 8 and all(0 <= r["fields_right"] <= 1 for r in long["rows"])
    assert all(r["fields_right"] is None for r in short["rows"])
    assert bench.main(["--tables", str(out)]) == 0  # the tables again, from the saved numbers
    assert capsys.readouterr().out.strip() == printed.strip()


@pytest.mark.parametrize("argv, message", [(["--models", "tiny"], "NAME=DIR items"),
                                           (["--models", "a=x", "a=y"], "names 'a' twice"),
                                           (["--models", "a=/nonexistent"], "no model at /nonexistent"),
                                           (["--model", "x", "--models", "a=x"], "--models NAME=DIR"),
                                           (["--models", "a=x", "--caches", "dual"], "unknown workload or cache"),
                                           (["--models", "a=x", "--ratios", "0.5,1.5"], "kept shares in [0, 1)"),
                                           (["--models", "a=x", "--split-step", "8"],
                                            "--split-step 8 must be inside the 8 steps of the short workload")])
def test_bad_arguments_are_one_line(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
