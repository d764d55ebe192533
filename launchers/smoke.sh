#!/usr/bin/env bash
#
# The README's smoke job, end to end on CPU (a few minutes on 2 cores):
#
#   bash launchers/smoke.sh
#
#   1. corpus      tools/build_corpus.py      stdlib sources -> $DIR/data/corpus.jsonl (8 MB)
#   2. tokenizer   tools/train_tokenizer.py   BPE, 2000 pieces -> $DIR/tokenizer/spm.model
#   3. preprocess  tools/preprocess_data.py   -> $DIR/data/corpus_text_document.{bin,idx}
#   4. train       configs/smoke.yaml via launchers/local.sh, in two invocations: iterations
#                  1..150, then a second start that resumes from the iteration-150 checkpoint
#                  and trains to 300 (same LR schedule: lr_decay_iters=300 in both), i.e. what
#                  a preempted and restarted job does
#   5. evaluate    tools/elastic_eval.py      loss / perplexity at every inference k'
#   6. export      tools/convert_to_hf.py     Hugging Face directory $DIR/hf
#   then prints the final validation loss next to the unigram entropy of the corpus (the loss
#   of the best model that ignores context), and the time of each step.
#
# Steps 1-3 are skipped when their outputs exist (SMOKE_FRESH=1 rebuilds them); the
# checkpoints, TensorBoard logs, evaluation and export of a previous run are removed first so
# every run trains from scratch and gives the same numbers.
#
# Environment knobs:
#   PYTHON       interpreter with the requirements [<repo>/.venv/bin/python if present, else python3]
#   SMOKE_DIR    where everything goes [runs/smoke, the paths configs/smoke.yaml names]
#   SMOKE_FRESH  1 = rebuild corpus, tokenizer and indexed data too [0]
#   SMOKE_NPROC  training processes [1]; e.g. 2 with SMOKE_OVERRIDES=parallel.expert_model_parallel_size=2
#   SMOKE_ITERS  total iterations [300, as in configs/smoke.yaml]
#   SMOKE_OVERRIDES  extra section.key=value overrides for training (word-split)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
cd "$REPO"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
DIR=${SMOKE_DIR:-runs/smoke}
FRESH=${SMOKE_FRESH:-0}
NPROC=${SMOKE_NPROC:-1}
ITERS=${SMOKE_ITERS:-300}
HALF=$((ITERS / 2))
read -r -a EXTRA <<<"${SMOKE_OVERRIDES:-}"
export WANDB_MODE=${WANDB_MODE:-disabled}

CORPUS=$DIR/data/corpus.jsonl
TOKENIZER=$DIR/tokenizer/spm
DATA=$DIR/data/corpus
PREFIX=${DATA}_text_document
CKPT=$DIR/checkpoints
LOGS=$DIR/logs

T_START=$SECONDS
TIMES=()
step_t0=0
say() { printf '\n==> %s\n' "$*"; }
begin() { step_t0=$SECONDS; say "$*"; }
done_step() { TIMES+=("$(printf '%-12s %4ds' "$1" $((SECONDS - step_t0)))"); }
die() { echo "smoke.sh: ERROR: $*" >&2; exit 1; }
# run_logged LOG CMD...: full output to LOG, the screen without Python's warning chatter;
# returns CMD's exit code.
run_logged() {
    local log=$1 st
    shift
    set +e
    "$@" 2>&1 | tee "$log" |
        awk '/Warning: / { skip = 1; next } skip && /^  / { skip = 0; next } { skip = 0; print; fflush() }'
    st=("${PIPESTATUS[@]}")
    set -e
    return "${st[0]}"
}

say "smoke job: python=$PYTHON dir=$DIR cores=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?)"
"$PYTHON" -c 'import torch, megatron.core, sentencepiece' 2>/dev/null ||
    die "$PYTHON lacks the requirements: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e ."

# --- 1-3: data -----------------------------------------------------------------------------
rebuild=$FRESH
begin "1/6 corpus -> $CORPUS"
if [[ $rebuild == 1 || ! -s $CORPUS ]]; then
    mkdir -p "$(dirname "$CORPUS")"
    "$PYTHON" tools/build_corpus.py --output "$CORPUS" --max-bytes 8000000
    rebuild=1
else
    echo "exists (SMOKE_FRESH=1 rebuilds it): skipped"
fi
done_step corpus

begin "2/6 tokenizer -> $TOKENIZER.model"
if [[ $rebuild == 1 || ! -s $TOKENIZER.model ]]; then
    mkdir -p "$(dirname "$TOKENIZER")"
    "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --output-prefix "$TOKENIZER" \
        --vocab-size 2000 --model-type bpe
    rebuild=1
else
    echo "exists: skipped"
fi
done_step tokenizer

begin "3/6 preprocess -> $PREFIX.{bin,idx}"
if [[ $rebuild == 1 || ! -s $PREFIX.bin || ! -s $PREFIX.idx ]]; then
    rm -rf "$PREFIX" "$PREFIX".bin "$PREFIX".idx  # incl. the dataset index cache of old data
    "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --tokenizer-model "$TOKENIZER.model" \
        --output-prefix "$DATA" --workers 2 --no-progress
else
    echo "exists: skipped"
fi
done_step preprocess

# --- 4: training, interrupted halfway and resumed -----------------------------------------
rm -rf "$CKPT" "$DIR/tensorboard" "$DIR/eval" "$DIR/hf" "$LOGS"
mkdir -p "$LOGS"
TRAIN=(
    bash launchers/local.sh -n "$NPROC" configs/smoke.yaml
    "data.data_path=[$PREFIX]" "data.tokenizer_model=$TOKENIZER.model"
    "checkpoint.save=$CKPT" "checkpoint.load=$CKPT" "logging.tensorboard_dir=$DIR/tensorboard"
    "train.lr_decay_iters=$ITERS" "${EXTRA[@]}"
)
begin "4/6 train iterations 1..$HALF of $ITERS (log: $LOGS/train-1.log)"
rc=0
run_logged "$LOGS/train-1.log" "${TRAIN[@]}" "train.train_iters=$HALF" || rc=$?
((rc == 0)) || die "training (first part) failed with exit code $rc; see $LOGS/train-1.log"
[[ $(cat "$CKPT/latest_checkpointed_iteration.txt") == "$HALF" ]] || die "no checkpoint at iteration $HALF"
done_step train-1

begin "4/6 restart: resume at $HALF, train to $ITERS (log: $LOGS/train-2.log)"
rc=0
run_logged "$LOGS/train-2.log" "${TRAIN[@]}" "train.train_iters=$ITERS" || rc=$?
((rc == 0)) || die "training (resumed part) failed with exit code $rc; see $LOGS/train-2.log"
grep -q "resumed from $CKPT at iteration $HALF" "$LOGS/train-2.log" ||
    die "the second start did not resume from iteration $HALF; see $LOGS/train-2.log"
done_step train-2

# --- 5-6: evaluation and export (tools written alongside; skipped when absent) -------------
begin "5/6 elastic evaluation -> $DIR/eval"
if [[ -f tools/elastic_eval.py ]]; then
    rc=0
    run_logged "$LOGS/eval.log" "$PYTHON" tools/elastic_eval.py --load "$CKPT" --output-dir "$DIR/eval" || rc=$?
    ((rc == 0)) || die "tools/elastic_eval.py failed with exit code $rc; see $LOGS/eval.log"
else
    echo "skipped: tools/elastic_eval.py not found"
fi
done_step eval

begin "6/6 Hugging Face export -> $DIR/hf"
if [[ -f tools/convert_to_hf.py ]]; then
    rc=0
    run_logged "$LOGS/export.log" "$PYTHON" tools/convert_to_hf.py --load "$CKPT" --output "$DIR/hf" \
        --overwrite --no-progress || rc=$?
    ((rc == 0)) || die "tools/convert_to_hf.py failed with exit code $rc; see $LOGS/export.log"
else
    echo "skipped: tools/convert_to_hf.py not found"
fi
done_step export

# --- summary -----------------------------------------------------------------------------------
valid=$(sed -n 's/^final validation loss //p' "$LOGS/train-2.log" | tail -n1)
first=$(sed -n 's/^iter *\([0-9]*\)\/[0-9]* | loss \([0-9.]*\).*/\1 \2/p' "$LOGS/train-1.log" | head -n1)
read -r first_iter first_loss <<<"${first:-? ?}"
entropy=$("$PYTHON" - "$PREFIX" <<'EOF'
import sys
import numpy as np
prefix = sys.argv[1]
# Megatron .idx header: 9-byte magic, <Q version, <B dtype code.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
with open(prefix + ".idx", "rb") as f:
    header = f.read(18)
assert header[:9] == b"MMIDIDX\x00\x00", "not a Megatron indexed dataset"
tokens = np.memmap(prefix + ".bin", dtype=DTYPES[header[17]], mode="r")
counts = np.bincount(tokens.astype(np.int64))
p = counts[counts > 0] / counts.sum()
print(f"{float(-(p * np.log(p)).sum()):.4f} {len(tokens)}")
EOF
)
read -r H NTOK <<<"$entropy"
total=$((SECONDS - T_START))
say "summary"
printf '  %s\n' "${TIMES[@]}"
printf '  %-12s %4ds (%dm%02ds)\n' total "$total" $((total / 60)) $((total % 60))
printf '  %-28s %s nats/token\n' "training loss, iteration $first_iter" "$first_loss"
printf '  %-28s %s nats/token (iteration %s)\n' "final validation loss" "${valid:-?}" "$ITERS"
printf '  %-28s %s nats/token over %s tokens: the best loss without context\n' \
    "unigram entropy of corpus" "$H" "$NTOK"
echo "  outputs: $CKPT  $DIR/eval  $DIR/hf  $DIR/tensorboard  $LOGS"
