# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODEL ?= checkpoints/mmdiff-tiny
STAMP := $(VENV)/.mmdiff-installed

.PHONY: demo test install train data clean-venv

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

# Reproduce the shipped model (under 60 minutes on 2 CPU cores); the log lands beside it.
train: $(STAMP)
	$(VENV)/bin/mmdiff train --config configs/mmdiff-tiny.json --fresh 2>&1 | tee $(MODEL).train.log

clean-venv:
	rm -rf $(VENV)
