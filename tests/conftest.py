import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.data.speech import NO_SYNTHESISER, espeak_available

torch.set_num_threads(1)
# the bench scripts import their shared module as ``common``, as ``python bench/<name>.py`` finds it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str, monkeypatch) -> object:
    """``bench/<name>.py`` as a module (registered in ``sys.modules`` for the test's duration, as
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


#: the one reason every speech-synthesis test gives when it skips
NO_ESPEAK = f"{NO_SYNTHESISER}: tests that synthesise speech skip"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_espeak: synthesises speech with espeak-ng; skipped without it "
                                       "(checked when the test starts)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_espeak") is not None and not espeak_available():
        pytest.skip(NO_ESPEAK)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE trained on a few sentences (seconds)."""
    from mmdiff.tokenizer import train_tokenizer

    texts = ["how many red circles are there?", "where is the blue square?", "yes", "no", "top left",
             "a small red circle at the top left", "describe the image."] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def world_tokenizer():
    """The shipped recipe's tokenizer on a smaller corpus: questions and answers of the world."""
    from mmdiff.data.questions import world_texts
    from mmdiff.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(3000, seed="tests"), vocab_size=768, split_words=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random image-question model saved like a real one (tiny timm ViT, linear adapter)."""
    from mmdiff import decoder
    from mmdiff.adapters import ProjectorConfig
    from mmdiff.encoders import vision
    from mmdiff.model import ModelConfig, MultimodalDiffusionLM

    dec = decoder.preset("tiny-test", vocab_size=len(tiny_tokenizer))
    vis = vision.preset("tiny-test")
    cfg = ModelConfig(decoder=dec, vision=vis,
                      vision_adapter=ProjectorConfig(kind="linear", in_dim=vis.embed_dim, out_dim=dec.d_model))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-model")
    MultimodalDiffusionLM(cfg, tiny_tokenizer).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# released-format fixtures: tests/fixtures/<family>-tiny/, one complete checkpoint directory each
# ------------------------------------------------------------------------------------------------
#: the folder of checkpoint fixtures (its README.md says what each holds and how it was made)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_dirs() -> list[Path]:
    """Every checkpoint fixture directory: each folder of ``tests/fixtures`` with a ``config.json``,
    sorted by name. A new family is picked up by every test parametrised over them."""
    return sorted(d for d in FIXTURES.iterdir() if (d / "config.json").is_file())


def fixture_params() -> list:
    """``fixture_dirs()`` as pytest params, each with its directory name as id (``llada-tiny``, ...)."""
    return [pytest.param(d, id=d.name) for d in fixture_dirs()]


@pytest.fixture(scope="session", params=fixture_params())
def fixture_dir(request) -> Path:
    """Each checkpoint fixture directory in turn (a test that takes it runs once per family)."""
    return request.param


@pytest.fixture(scope="session")
def fixture_model(fixture_dir):
    """``mmdiff.load(fixture_dir)`` (float32, CPU), loaded once per directory per session."""
    import mmdiff

    return mmdiff.load(fixture_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> dict[str, Path]:
    """A small photo-like PNG (``image``, 48 x 30) and a one-second 16 kHz tone (``audio``, wav)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 48, 3), dtype=np.uint8)).save(root / "photo.png")
    t = np.arange(16000) / 16000
    sf.write(root / "question.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    return {"image": root / "photo.png", "audio": root / "question.wav"}


def media_for(model, media_files: dict[str, Path]) -> dict[str, Path | None]:
    """The media a fixture's model takes: an image when it has a vision encoder, a clip when it has an
    audio encoder (``{"image": path | None, "audio": path | None}``)."""
    return {"image": media_files["image"] if model.vision is not None else None,
            "audio": media_files["audio"] if model.audio is not None else None}
