# The two commands: `make demo` (the main job) and `make test` (ruff + pytest).
# Both create .venv and install preftune into it; nothing else needs to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The PyTorch build to install first. torch==2.13.0 is a CPU wheel cached on the project's build
# machines; on your own machine any torch>=2.3 works (e.g. `make test TORCH=torch`).
TORCH  ?= torch==2.13.0

.PHONY: test demo lint install chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The browser test drives Debian's Chromium; install it when we can (root with apt-get, as on CI).
# Elsewhere the browser test is skipped with a message that says how to enable it.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) chromium lint
	$(BIN)/python -m pytest -q

# The main job: the offline Shakespeare pipeline (base model -> SFT -> simulated annotators -> reward model,
# DPO, ORPO, PPO, RLOO -> evaluation against SFT -> demo_output/report.html). About 8 minutes on a 2-core CPU;
# running it again skips every finished stage. `make demo DEMO_ARGS=--quick` runs the same stages on tiny
# settings in under a minute on 2 CPU cores (measured figures: docs/demo.md).
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/preftune demo --output demo_output $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
