"""Write a copy of a model whose vision tower is the pretrained EfficientNet-Lite0 (``timm_cnn``, 96 px, its stride-16
stage: 6 x 6 tokens of 112) with a fresh vision adapter; the decoder and the speech path are kept. The starting point
of the swapped-tower fine-tune in bench/results/byod.md.

    python bench/sweeps/vision-lite0/swap_tower.py OUT [--model checkpoints/mmdiff-tiny]
        [--weights checkpoints/tf_efficientnet_lite0.safetensors]
"""
import argparse
import copy
import dataclasses
import shutil
from pathlib import Path

import torch

import mmdiff
from mmdiff.encoders.vision import VisionEncoderConfig
from mmdiff.model import MultimodalDiffusionLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--model", default="checkpoints/mmdiff-tiny")
    p.add_argument("--weights", default="checkpoints/tf_efficientnet_lite0.safetensors", help="make vision-weights")
    args = p.parse_args()
    if not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file; write it with make vision-weights")
    base = mmdiff.load(args.model)
    cfg = copy.deepcopy(base.cfg)
    cfg.vision = VisionEncoderConfig(kind="timm_cnn", name="tf_efficientnet_lite0", img_size=96, layer=3,
                                     weights=str(Path(args.weights).resolve()))
    cfg.vision_adapter = dataclasses.replace(cfg.vision_adapter, in_dim=112)
    torch.manual_seed(0)
    model = MultimodalDiffusionLM(cfg, base.tokenizer)
    kept = {k: v for k, v in base.state_dict().items() if not k.startswith(("vision.", "vision_adapter."))}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(("vision.", "vision_adapter.")) for k in missing)
    model.save_pretrained(args.out)
    for extra in ("ctc_lm.json",):
        if (Path(args.model) / extra).is_file():
            shutil.copy(Path(args.model) / extra, args.out)
    print(f"wrote {args.out}: {args.model} with the EfficientNet-Lite0 tower and a fresh vision adapter")


if __name__ == "__main__":
    main()
