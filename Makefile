.PHONY: demo test lint bench

# Fresh machine -> virtualenv -> Shakespeare -> tokenizer + shards -> train the small model -> samples.
demo:
	bash scripts/demo.sh

# The full test suite (what CI runs).
test:
	bash scripts/test.sh

lint:
	. scripts/env.sh && ruff check unmask tests bench

bench:
	. scripts/env.sh && python bench/train_step.py
