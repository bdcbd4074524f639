# Two commands do all the set-up on a fresh machine:
#   make run    venv + install + quickstart sweep + report
#   make test   venv + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# tensorflow[and-cuda] where an NVIDIA driver answers, tensorflow-cpu elsewhere
EXTRA  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SWEEP  ?= sweeps/quickstart.yaml
PYTEST_ARGS ?=
# Real MNIST: $HARNESS_DATA_DIR if set, else ../shared/data when present, else Keras' download.
HARNESS_DATA_DIR ?= $(if $(wildcard ../shared/data/mnist.npz),$(abspath ../shared/data),)
export HARNESS_DATA_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test test-fast venv clean

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),dev]"
	touch $@

venv: $(BIN)/harness

# The report is written even when some runs failed (exit 1: they are listed in it); bad input (2) stops.
run: venv
	@$(BIN)/harness sweep $(SWEEP); rc=$$?; [ $$rc -le 1 ] || exit $$rc; \
	$(BIN)/harness report --sweep "$$($(BIN)/python -c "import yaml; print(yaml.safe_load(open('$(SWEEP)'))['name'])")" \
	&& exit $$rc

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
