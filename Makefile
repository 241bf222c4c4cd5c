.PHONY: demo test test-fast lint bench

# Fresh machine -> virtualenv -> Shakespeare -> tokenizer + shards -> train the small model -> samples.
demo:
	bash scripts/demo.sh

# The full test suite (what CI runs), with the 15 slowest tests listed at the end.
test:
	bash scripts/test.sh --durations=15

# Unit tests and the end-to-end smoke test: a few minutes, for after each change.
test-fast:
	bash scripts/test.sh -m "not slow or smoke" --durations=10

lint:
	. scripts/env.sh && ruff check unmask tests bench

bench:
	. scripts/env.sh && python bench/train_step.py
