"""What a new user hits first, at the edges of every command: config files with values of the wrong
type, output paths that cannot be folders or cannot be written, devices this machine lacks, a demo
port in use, bad spoken-question flags, a machine without espeak-ng, the default model found from any
directory. Each is one line on stderr and exit status 2, never a traceback and never a lost file."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mmdiff import DEFAULT_MODEL_DIR, cli
from mmdiff.adapters import ProjectorConfig
from mmdiff.commands import demo
from mmdiff.commands.options import add_speech_arguments
from mmdiff.data import speech
from mmdiff.decoder import DecoderConfig
from mmdiff.encoders.audio import AudioEncoderConfig
from mmdiff.io import atomic_write_bytes, config_from_dict
from mmdiff.sampling import SearchConfig
from mmdiff.training.recipe import StageConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "mmdiff-tiny.json"
IMAGE = ROOT / "checkpoints" / "mmdiff-tiny" / "examples" / "images" / "test-0-000006.png"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is available")


def fails(argv: list[str], capsys) -> str:
    """Run ``mmdiff ARGV``, check it exits 2 with one line on stderr, return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mmdiff {argv[0]}: error: "), err
    return err.strip()


# --- config files: every value checked against its field's type -----------------------------------

@pytest.mark.parametrize("cls, data, message", [
    (DecoderConfig, {"d_model": "192"}, "d_model must be an int, got '192'"),
    (DecoderConfig, {"n_layers": True}, "n_layers must be an int, got True"),  # bool is not int
    (DecoderConfig, {"n_layers": 4.0}, "n_layers must be an int, got 4.0"),
    (DecoderConfig, {"qkv_bias": 1}, "qkv_bias must be a bool (true or false), got 1"),
    (DecoderConfig, {"rope_theta": "1e4"}, "rope_theta must be a number, got '1e4'"),
    (DecoderConfig, {"attn_mode": None}, "attn_mode must be a string, got None"),
    (ProjectorConfig, {"kind": "linear", "in_dim": 4, "out_dim": 4, "grid": [4]},
     "grid must be a list of 2 ints or null, got [4]"),
    (ProjectorConfig, {"kind": "linear", "in_dim": 4, "out_dim": 4, "grid": "4x4"},
     "grid must be a list of 2 ints or null, got '4x4'"),
    (AudioEncoderConfig, {"output_layers": [-1, "2"]}, "output_layers must be a list of ints, got [-1, '2']"),
    (SearchConfig, {"checkpoints": 0.5}, "checkpoints must be a list of numbers, got 0.5"),
    (StageConfig, {"name": "s", "kind": "ar", "steps": "10"}, "steps must be an int, got '10'"),
    (StageConfig, {"name": "s", "kind": "ar", "steps": 1, "train": "decoder"}, "train must be a list of strings"),
])
def test_a_config_value_of_the_wrong_type_is_named(cls, data, message) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"config.json x: {message}")):
        config_from_dict(cls, data, source="config.json x")


def test_json_values_of_the_right_type_are_read() -> None:
    """An int for a float, lists for tuples, null for an optional field, as JSON gives them."""
    assert config_from_dict(DecoderConfig, {"rope_theta": 500000, "norm_eps": 1e-6}).rope_theta == 500000
    cfg = config_from_dict(ProjectorConfig, {"kind": "linear", "in_dim": 4, "out_dim": 4, "grid": [2, 2]})
    assert cfg.grid == (2, 2)
    assert config_from_dict(ProjectorConfig, {"kind": "linear", "in_dim": 4, "out_dim": 4, "grid": None}).grid is None
    assert config_from_dict(SearchConfig, {"checkpoints": [0.25, 0.5]}).checkpoints == (0.25, 0.5)
    assert TrainConfig.from_file(RECIPE).stages[0].train  # the committed recipes read as before
    assert TrainConfig.from_file(ROOT / "configs" / "mmdiff-tiny-diffusion-only.json").out


def test_a_model_config_with_a_string_width_is_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["decoder"]["d_model"] = str(config["decoder"]["d_model"])
    (bad / "config.json").write_text(json.dumps(config))
    line = fails(["caption", "--model", str(bad), "--image", str(IMAGE), "--format", "text"], capsys)
    assert line == f"mmdiff caption: error: {bad / 'config.json'} decoder: d_model must be an int, got '32'"


# --- output paths -----------------------------------------------------------------------------------

def test_data_train_and_convert_refuse_a_file_where_a_folder_goes(tmp_path: Path, capsys) -> None:
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    assert "--out" in fails(["data", "--out", str(taken), "--n", "2", "--quiet"], capsys)
    assert f"{taken} is a file, so no folder" in fails(["data", "--out", str(taken / "d"), "--n", "2"], capsys)
    assert f"--out {taken} is an existing file" in fails(["train", "--config", str(RECIPE), "--out", str(taken)],
                                                         capsys)
    assert f"DST {taken} is an existing file" in fails(["convert", DEFAULT_MODEL_DIR, str(taken)], capsys)
    assert f"DST {taken / 'x'}: {taken} is a file" in fails(["convert", DEFAULT_MODEL_DIR, str(taken / "x")], capsys)
    assert taken.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [taken]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


READ_ONLY_SCRIPT = """
import sys
from mmdiff import cli
ro = sys.argv[1]
for argv in (["data", "--out", ro + "/d", "--n", "2", "--quiet"], ["eval", "--data", sys.argv[2], "--out", ro + "/run",
             "--gen-length", "4", "--quiet"], ["train", "--config", sys.argv[3], "--out", ro + "/m"],
             ["convert", sys.argv[4], ro + "/c"]):
    print(cli.main(argv), flush=True)
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (a private mount namespace) to mount a "
                                                 "read-only tmpfs; root ignores chmod, so nothing else can show it")
def test_a_read_only_file_system_is_refused_by_every_command(tmp_path: Path) -> None:
    """A real read-only tmpfs, mounted in a private mount namespace (nothing is mounted for the host)."""
    from mmdiff.data import write_split

    ro = tmp_path / "ro"
    ro.mkdir()
    data = write_split(tmp_path / "data", split="test", n=2, seed=0, progress=False)
    script = f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && exec {sys.executable} -c '{READ_ONLY_SCRIPT}' " \
             f"{ro} {data} {RECIPE} {DEFAULT_MODEL_DIR}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2"] * 4, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["mmdiff data", "mmdiff eval", "mmdiff train", "mmdiff convert"]
    assert all(line.endswith(f"{ro} is on a read-only file system") for line in lines), lines


def test_atomic_writes_honour_the_umask_and_keep_a_files_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        (tmp_path / "a.json").chmod(0o600)  # a file the user made private stays private
        atomic_write_bytes(tmp_path / "a.json", b"[]")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600 and (tmp_path / "a.json").read_bytes() == b"[]"
    finally:
        os.umask(old)


# --- devices, the demo's port -------------------------------------------------------------------------

@NO_GPU
def test_convert_on_a_missing_gpu_is_one_line(tmp_path: Path, capsys) -> None:
    line = fails(["convert", DEFAULT_MODEL_DIR, str(tmp_path / "c"), "--device", "cuda"], capsys)
    assert line == "mmdiff convert: error: --device cuda: not available on this machine; available: cpu"


def test_devices_are_checked_against_what_torch_sees(monkeypatch) -> None:
    """The GPU branch, on a machine that may have none: torch is told there is one CUDA device."""
    from mmdiff.io import available_devices, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert available_devices()[:2] == ["cpu", "cuda:0"]
    assert [check_device(d) for d in ("cpu", "cuda", "cuda:0")] == ["cpu", "cuda", "cuda:0"]
    with pytest.raises(ValueError, match=r"^--device cuda:1: not available on this machine; available: cpu, cuda:0"):
        check_device("cuda:1")


def test_the_demo_refuses_a_port_in_use(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = argparse.Namespace(model=DEFAULT_MODEL_DIR, host="127.0.0.1", port=port, engine=False, max_batch=None)
        with pytest.raises(ValueError, match=f"^127.0.0.1:{port} is already in use"):
            demo.run(args)
        assert "choose another --port" in fails(["demo", "--port", str(port)], capsys)
    assert "a TCP port is 1-65535" in fails(["demo", "--port", "70000"], capsys)


# --- the command line: user errors are one line, bugs keep their traceback -------------------------------

def _command_raising(monkeypatch, error: BaseException) -> None:
    module = types.ModuleType("mmdiff_test_command")
    module.add_arguments = lambda p: None

    def run(args):
        raise error

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a command that fails"))


@pytest.mark.parametrize("error, line", [
    (ValueError("--x must be positive"), "--x must be positive"),
    (FileNotFoundError("dataset file not found: d.jsonl"), "dataset file not found: d.jsonl"),
    (PermissionError(errno.EACCES, "Permission denied", "/out/x"), "/out/x: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/out"), "/out: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: Not a directory"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: Read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/p"), "/out/p: No space left on device"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, error, line) -> None:
    _command_raising(monkeypatch, error)
    assert fails(["fake"], capsys) == f"mmdiff fake: error: {line}"


@pytest.mark.parametrize("error", [KeyError("x"), TypeError("bug"), RuntimeError("bug"), OSError(errno.EIO, "I/O")])
def test_bugs_keep_their_traceback(monkeypatch, error) -> None:
    _command_raising(monkeypatch, error)
    with pytest.raises(type(error)):
        cli.main(["fake"])


@pytest.mark.parametrize("flags, message", [
    (["--asr-beam", "-1"], "argument --asr-beam: must be a finite number >= 0, got -1"),
    (["--asr-beam", "2.5"], "argument --asr-beam: expected a whole number, got '2.5'"),
    (["--asr-lm-weight", "-0.1"], "argument --asr-lm-weight: must be a finite number >= 0, got -0.1"),
    (["--asr-lm-weight", "nan"], "argument --asr-lm-weight: must be a finite number >= 0, got nan"),
    (["--asr-length-bonus", "inf"], "argument --asr-length-bonus: must be a finite number, got inf"),
])
def test_bad_spoken_question_flags_are_one_line(flags, message, capsys) -> None:
    parser = cli.OneLineParser(prog="mmdiff ask")
    add_speech_arguments(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(flags)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"mmdiff ask: error: {message} (see mmdiff ask --help)\n"
    good = parser.parse_args(["--asr-beam", "0", "--asr-lm-weight", "0", "--asr-length-bonus", "-1.5"])
    assert (good.asr_beam, good.asr_lm_weight, good.asr_length_bonus) == (0, 0.0, -1.5)


def test_convert_help_says_what_it_takes(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "LLaDA or Dream checkpoint directory, or an mmdiff-decoder directory" in help_text
    assert "an mmdiff model directory needs no conversion" in help_text


def test_convert_refuses_an_mmdiff_model_directory_by_name(tmp_path: Path, capsys) -> None:
    line = fails(["convert", DEFAULT_MODEL_DIR, str(tmp_path / "c")], capsys)
    assert line.endswith("is an mmdiff model directory: it needs no conversion (give it as --model, or mmdiff.load "
                         "it); convert takes text-only LLaDA / Dream checkpoints and mmdiff-decoder directories")


# --- first steps --------------------------------------------------------------------------------------

def test_the_default_model_is_found_from_any_directory(tmp_path: Path) -> None:
    assert Path(DEFAULT_MODEL_DIR) == ROOT / "checkpoints" / "mmdiff-tiny"
    proc = subprocess.run([sys.executable, "-m", "mmdiff", "caption", "--image", str(IMAGE), "--format", "text"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a large cyan cross" in proc.stdout  # the shipped model answered


def test_without_espeak_speech_is_refused_by_name_and_its_tests_skip(tmp_path: Path, monkeypatch, capsys) -> None:
    """espeakng-loader is a dependency, so only this test exercises a machine without libespeak-ng: the
    package is hidden."""
    from conftest import NO_ESPEAK, pytest_runtest_setup

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    speech._library.cache_clear()
    try:
        assert not speech.espeak_available()
        with pytest.raises(RuntimeError, match="^libespeak-ng not found: spoken questions need the espeakng-loader"):
            speech.synthesize("hi", tmp_path / "q.wav", voice="en-us", speed=150, pitch=50, snr_db=20.0,
                              rng=__import__("random").Random(0))
        line = fails(["data", "--out", str(tmp_path / "d"), "--n", "2", "--audio", "--quiet"], capsys)
        assert line == f"mmdiff data: error: --audio: {speech.NO_SYNTHESISER}"
        line = fails(["train", "--config", str(RECIPE), "--out", str(tmp_path / "m")], capsys)
        assert line.endswith(f"trains on spoken questions (speech_clips 4000): {speech.NO_SYNTHESISER}")
    finally:
        speech._library.cache_clear()
    assert not (tmp_path / "d").exists() and not (tmp_path / "m").exists()
    marked = types.SimpleNamespace(get_closest_marker=lambda name: object() if name == "needs_espeak" else None)
    with pytest.raises(pytest.skip.Exception, match=re.escape(NO_ESPEAK)):
        pytest_runtest_setup(marked)


def _door_argv(command: str, model: Path, tmp_path: Path) -> list[str]:
    """A minimal argv of each model-loading door (its required inputs given, all real files)."""
    from PIL import Image

    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "image": str(img), "question": "q?", "answers": ["a"]}) + "\n")
    return {"ask": ["ask", "what?", "--image", str(img)], "caption": ["caption", "--image", str(img)],
            "eval": ["eval", "--data", str(data), "--out", str(tmp_path / "o")],
            "demo": ["demo"], "serve": ["serve"]}[command] + ["--model", str(model)]


@NO_GPU
@pytest.mark.parametrize("command", ["ask", "caption", "eval", "demo", "serve"])
@pytest.mark.parametrize("extra, message", [
    (["--device", "banana"], "--device 'banana' is not a device name; available: cpu"),
    (["--device", "cuda:7"], "--device cuda:7: not available on this machine; available: cpu"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from 'auto', 'float32', 'bfloat16', "
                          "'float16')"),
])
def test_every_door_refuses_a_bad_device_or_dtype_in_one_line(command, extra, message, tiny_model_dir,
                                                               tmp_path: Path, capsys) -> None:
    argv = _door_argv(command, tiny_model_dir, tmp_path) + extra
    try:
        line = fails(argv, capsys)
    except SystemExit as e:  # argparse's own refusal (choices)
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        line = err.strip()
    assert line.startswith(f"mmdiff {command}: error: ") and message in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, value, message", [
    ("pad_silence", [0.5, 0.1], "pad_silence [0.5, 0.1] must be [lo, hi] seconds with 0 <= lo <= hi"),
    ("speed_perturb", [1.1, 0.9], "speed_perturb [1.1, 0.9] must be [lo, hi] with 0 < lo <= hi"),
    ("speed_perturb", [1.1], "speed_perturb must be a list of 2 numbers or null, got [1.1]"),
    ("synthetic_accents", [0, 0.5], "synthetic_accents [0, 0.5] must be [n, share] or [n, share, k] with "
                                    "integers n >= 1 and k >= 0 and 0 < share <= 1"),
    ("synthetic_accents", [200, 0.5, -1], "synthetic_accents [200, 0.5, -1] must be [n, share] or [n, share, k]"),
])
def test_a_bad_speech_augmentation_range_is_one_line(key, value, message, tmp_path: Path, capsys) -> None:
    recipe = json.loads(RECIPE.read_text()) | {key: value}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    assert message in fails(["train", "--config", str(path), "--out", str(tmp_path / "m")], capsys)
    assert not (tmp_path / "m").exists()
