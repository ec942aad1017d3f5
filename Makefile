# Two commands do everything on a fresh machine:
#   make train   set up .venv (once) and run the main job
#   make test    set up .venv (once) and run the test suite
VENV ?= .venv
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup train test lint bench

setup:
	@bash scripts/setup.sh

train: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed launch/train.py --deepspeed ds_configs/24gb.json \
		--overwrite_output_dir true

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup tests

lint: setup
	$(VENV)/bin/ruff check meft_ds launch tests bench scripts examples
