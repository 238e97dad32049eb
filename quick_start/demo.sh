#!/usr/bin/env bash
# The whole workflow on an embedded demo corpus, on CPU, in a few minutes:
#   1. build a ~2.4 MB English corpus from the Python standard library's own documentation
#   2. txt -> jsonl -> index (plus the bilingual instruction file shipped in quick_start/data/)
#   3. mixture loader statistics for dataset_configs/demo.json
#   4. train the tiny dragonfly with 2 processes (FSDP2 on gloo), tensorboard, checkpoint,
#      loss curve, and a generated sample
# Outputs go to demo_out/ and data/ in the checkout. Set DEMO_SKIP_TRAIN=1 to stop after step 3.
set -euo pipefail
cd "$(dirname "$0")/.."
source quick_start/_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

out=demo_out
mkdir -p "$out/raw/demo_corpus" "$out/raw/instructions"

echo "== 1. demo corpus (Python standard library documentation)"
if [ ! -s "$out/corpus.txt" ]; then
  python quick_start/build_demo_corpus.py "$out/corpus.txt"
fi

echo "== 2. txt -> jsonl -> index"
python quick_start/convert_txt2jsonl.py --doc-sep blank < "$out/corpus.txt" > "$out/raw/demo_corpus/corpus.jsonl"
cp quick_start/data/instructions.jsonl "$out/raw/instructions/instructions.jsonl"
for name in demo_corpus instructions; do
  python quick_start/convert_json2index.py --path "$out/raw/$name" --language en \
    --output "$out/index/$name" --tokenizer quick_start/tokenizer.model --overwrite
done
python - "$out/index/demo_corpus/meta.json" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
print({k: meta[k] for k in ("nlines", "nbytes", "avg_token_per_line", "length_distribute")})
PY

echo "== 3. mixture loader statistics (dataset_configs/demo.json)"
python -m fm.data.stats --dataset-config dataset_configs/demo.json --tokenizer quick_start/tokenizer.model \
  --batch-size 4 --max-length 512 --rows 400

if [ "${DEMO_SKIP_TRAIN:-0}" = "1" ]; then
  exit 0
fi

echo "== 4. train the tiny dragonfly: 2 processes, FSDP2 on gloo (apps/fm9g_2b/train_configs/tiny.json)"
# The demo starts fresh every time; your own runs resume with resume_ckpt "latest".
rm -rf "$out/checkpoints/tiny_demo" "$out/tensorboard/tiny_demo"
GPUS_PER_NODE=2 bash apps/fm9g_2b/pretrain_dragonfly.sh --config apps/fm9g_2b/train_configs/tiny.json \
  --save "$out/checkpoints" --tensorboard "$out/tensorboard" --resume_ckpt ""

echo "== 5. a generated sample from the last checkpoint"
python -m fm.generate --checkpoint "$out/checkpoints/tiny_demo" --tokenizer quick_start/tokenizer.model \
  --prompt "The module" --max-new-tokens 40 --do-sample --temperature 0.8 --top-k 40 \
  --repetition-penalty 1.2 --seed 1

echo
echo "checkpoints:  $out/checkpoints/tiny_demo/"
echo "tensorboard:  tensorboard --logdir $out/tensorboard"
echo "loss curve:   $out/checkpoints/tiny_demo/loss_curve.png (per-step stats: train_stats.jsonl beside it)"
