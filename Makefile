# lmforge — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LMF    := $(BIN)/lmforge
DEMO   := runs/demo
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that these machines provide; the package's own range
# (torch<2.14) is then already satisfied, so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# demo: configs/pipelines/demo.yaml run by `lmforge run` (docs/PIPELINES.md): fetch -> prepare -> tokenizer ->
# tokenize -> pretrain -> sample -> tasks -> eval, each stage skipped when its output is up to date (a second
# `make demo` takes seconds); Ctrl-C stops the running stage, and the next `make demo` resumes there.
demo: setup
	$(LMF) run configs/pipelines/demo.yaml --var run=$(DEMO)
	@$(BIN)/python -c "import json; m=json.load(open('$(DEMO)/model/summary.json'))['metrics']; \
	print(f\"\nfinal val loss {m['final_val_loss']:.3f} (best {m['best_val_loss']:.3f}), {m['tokens_per_s']:,.0f} tokens/s\"); \
	print('corpus     $(DEMO)/corpus'); print('tokenizer  $(DEMO)/tokenizer/tokenizer.json'); \
	print('tokens     $(DEMO)/tokens'); print('model      $(DEMO)/model/checkpoints/best'); \
	print('report     $(DEMO)/model/report.md  (curves: $(DEMO)/model/loss.png)'); \
	print('sample     $(DEMO)/sample.txt'); \
	print('eval       $(DEMO)/eval/report.md  (tasks: $(DEMO)/tasks)')"

# demo-chat: post-training on the `make demo` model (docs/POSTTRAIN.md, "The demo: make demo-chat"), as
# configs/pipelines/chat.yaml run by `lmforge run`:
# chat data mined from the plays, SFT with LoRA, DPO on the SFT model, then base vs SFT vs DPO on
# held-out passages (table printed and written to $(CHAT)/summary.json).
CHAT := $(DEMO)/posttrain

.PHONY: demo-chat
demo-chat: setup
	@test -f $(DEMO)/model/checkpoints/best/model.safetensors -a -f $(DEMO)/data/summary.json || \
	{ echo "demo-chat: no demo model in $(DEMO)/model (or no prepared data in $(DEMO)/data); run 'make demo' first" >&2; \
	exit 2; }
	$(LMF) run configs/pipelines/chat.yaml --var run=$(DEMO) --var chat=$(CHAT)
	@$(BIN)/python -c "import json; from lmforge.posttrain.evaluate import format_table; \
	print(format_table(json.load(open('$(CHAT)/summary.json')))); print('summary: $(CHAT)/summary.json')"

# ruff first: the lint rules (120-character lines included) are part of the test
test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/train_speed.py --preset both
	$(BIN)/python benchmarks/learn_nano.py
	$(BIN)/python benchmarks/precision_crossover.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
