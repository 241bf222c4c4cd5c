.PHONY: demo demo-scratch test test-fast lint bench

# Fresh machine -> virtualenv -> BBC News -> SmolLM2-135M adapted to masked diffusion -> samples, infills ->
# few-step distillation -> Hugging Face export (35-40 minutes on 2 cores, venv included; README "Two commands").
demo:
	bash scripts/demo.sh

# The from-scratch path the cluster presets take, at laptop size: tokenizer -> pretrain the 0.16M-parameter model ->
# samples -> distillation -> export -> SFT (~25 minutes on 2 cores).
demo-scratch:
	bash scripts/demo-scratch.sh

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
