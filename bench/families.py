"""The released families: which decode features run on each, and the parameters of their real sizes.

Part 1 loads every checkpoint fixture (``tests/fixtures/*``, tiny random checkpoints in the released
on-disk formats) and the shipped model, and runs one question through :func:`mmdiff.search.answer`
with each decode setting: ``ok``, or the refusal's message. Part 2 counts the parameters of the
released-size components from their shapes (mmdiff's modules built on the meta device; nothing is
downloaded or allocated). Both tables feed ``docs/models.md``.

    python bench/families.py --threads 2
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import common
import numpy as np
import soundfile as sf
import torch
from PIL import Image

import mmdiff
from mmdiff.adapters import DiffaAdapterConfig, ProjectorConfig, build_adapter
from mmdiff.decoder import Decoder, DecoderConfig
from mmdiff.encoders.audio import AudioEncoderConfig, build_audio_encoder
from mmdiff.encoders.vision import VisionEncoderConfig, build_vision_encoder
from mmdiff.sampling import DecodeConfig
from mmdiff.search import answer

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
#: decode settings (flat option keys, as the plugin's model_args); the fixtures have 2 decoder layers,
#: so pruning and skipping act at layer 1
SETTINGS: dict[str, dict[str, str]] = {
    "vanilla": {},
    "prefix cache": {"cache": "prefix"},
    "block cache": {"cache": "block", "block_length": "4"},
    "dual cache": {"cache": "dual", "block_length": "4"},
    "threshold 0.9": {"transfer": "threshold"},
    "FastV 50%": {"prune": "fastv", "keep_ratio": "0.5", "prune_layer": "1"},
    "DivPrune 50%": {"prune": "divprune", "keep_ratio": "0.5", "prune_layer": "1"},
    "layer skip 1": {"skip_layers": "1"},
    "best-of-N 2": {"search": "best_of_n", "candidates": "2"},
}


def feature_rows(media: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """(model, its exact cache, per setting ``ok`` or the refusal) for the shipped model and every fixture."""
    rows = []
    for d in [Path(mmdiff.DEFAULT_MODEL_DIR), *sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())]:
        model = mmdiff.load(d, dtype=torch.float32, device="cpu")
        images = [str(media["image"]) if model.vision is not None else None]
        audios = [str(media["audio"]) if model.audio is not None else None]
        cells = []
        for values in SETTINGS.values():
            decode = DecodeConfig().with_values({"gen_length": "8", **values}, parse=True)
            try:
                answer(model, ["what is it?"], images=images, audios=audios, decode=decode)
                cells.append("ok")
            except ValueError as e:
                cells.append(f"refused: {e}")
        rows.append((d.name, model.exact_cache, cells))
    return rows


def parameter_rows() -> list[tuple[str, int]]:
    """Parameters of the released components at their real sizes, from shapes alone."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llada = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=12288, tie_embeddings=False)
    with torch.device("meta"):
        return [
            ("LLaDA-8B decoder (vocabulary 126,464)", n(Decoder(DecoderConfig(vocab_size=126464, **llada)))),
            ("MMaDA-8B decoder (vocabulary 134,656)", n(Decoder(DecoderConfig(vocab_size=134656, **llada)))),
            ("Dream-v0-7B decoder (vocabulary 152,064)",
             n(Decoder(DecoderConfig(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                     mlp_hidden=18944, qkv_bias=True, tie_embeddings=False)))),
            ("SigLIP so400m-patch14-384, last block dropped (LLaDA-V, LaViDa)",
             n(build_vision_encoder(VisionEncoderConfig(kind="siglip", name="siglip-so400m-patch14-384", layer=-2)))),
            ("Qwen2.5-VL 7B vision tower (Dimple)",
             n(build_vision_encoder(VisionEncoderConfig(kind="qwen2_5_vl", name="qwen2.5-vl-7b")))),
            ("MAGVIT-v2 encoder + quantiser (MMaDA)",
             n(build_vision_encoder(VisionEncoderConfig(kind="magvit2", name="magvitv2")))),
            ("Whisper-small encoder (DIFFA)",
             n(build_audio_encoder(AudioEncoderConfig(kind="whisper", d_model=768, encoder_layers=12,
                                                      encoder_attention_heads=12, encoder_ffn_dim=3072,
                                                      num_mel_bins=80, max_source_positions=1500)))),
            ("DIFFA dual adapter (768 -> 4096)", n(build_adapter(DiffaAdapterConfig(kind="diffa", in_dim=768, out_dim=4096)))),
            ("mlp2x_gelu 1152 -> 4096 (LLaDA-V, LaViDa-LLaDA)",
             n(build_adapter(ProjectorConfig(kind="mlp2x_gelu", in_dim=1152, out_dim=4096)))),
            ("mlp2x_gelu 1152 -> 3584 (LaViDa-Dream)",
             n(build_adapter(ProjectorConfig(kind="mlp2x_gelu", in_dim=1152, out_dim=3584)))),
            ("mlp2x_silu 3584 -> 3584 (Dimple)",
             n(build_adapter(ProjectorConfig(kind="mlp2x_silu", in_dim=3584, out_dim=3584)))),
        ]


def main() -> None:
    p = common.parser(__doc__, threads=2)
    args = p.parse_args()
    common.start(p, args)
    warnings.filterwarnings("ignore")
    logging.getLogger("mmdiff").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        media = {"image": Path(tmp) / "image.png", "audio": Path(tmp) / "clip.wav"}
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 30, 3), dtype=np.uint8)).save(media["image"])
        sf.write(media["audio"], 0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220).astype("float32"), 16000)
        rows = feature_rows(media)
    print("| model | exact cache | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for name, exact, cells in rows:
        print(f"| {name} | {exact} | " + " | ".join(cells) + " |")
    print("\n| component (released size) | parameters |\n|---|---|")
    for name, count in parameter_rows():
        print(f"| {name} | {count:,} |")


if __name__ == "__main__":
    main()
