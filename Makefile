# The two commands of the README:
#   make run    set up .venv if needed, then run the main job on the embedded default
#   make test   set up .venv if needed, then run the test suite
#   make study  set up .venv if needed, then run the default study (conf/studies/shell_game.yaml)
#   make gpu-check  the prepared GPU check (benchmarks/gpu_check.py, docs/gpu_check.md)
PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 || ls /root/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | head -1 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test study gpu-check setup clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-vllm.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	# torch first and alone so that pip takes the local CPU wheel rather than a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --ignore-requires-python -r requirements.txt -r requirements-dev.txt -c constraints.txt
	# vLLM's CPU build, constrained by the pins above; it drags in CUDA torchvision/torchaudio/
	# torchcodec builds that break `import vllm` on CPU torch, and nothing here needs them.
	$(PY) -m pip install -q --ignore-requires-python -r requirements-vllm.txt -c requirements.txt -c constraints.txt
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) recipes/compression_experiment.py $(ARGS)

study: $(STAMP)
	$(PY) recipes/study.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests $(ARGS)

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs
