#!/usr/bin/env bash
#SBATCH --job-name=megatron-elastic-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Fine-tune a Hugging Face MoE into an elastic one, in one command:
#
#   launchers/finetune.sh HF_DIR DATA [section.key=value ...]
#
#   1. import     tools/convert_from_hf.py   HF_DIR -> $RUN_DIR/imported (checkpoint + recipe + tokenizer)
#   2. data       DATA = a chat jsonl file ('messages' or 'prompt'/'response' per line): every
#                 HOLDOUT_EVERY-th conversation is held out, both parts are preprocessed with the
#                 imported tokenizer's chat template (tools/preprocess_data.py --chat) into
#                 $RUN_DIR/data/{train,heldout}_chat_document; or DATA = a preprocessed prefix
#                 (chat or text, .bin/.idx without the extension), held out by data.split of the
#                 recipe unless VALID_DATA names a held-out prefix
#   3. fine-tune  RECIPE [configs/finetune_emoe.yaml] on the imported model (its recipe is the
#                 base, RECIPE's sections override it, then the data and run paths, then the
#                 overrides given here): checkpoint.finetune=true from the import; a later run
#                 with the same RUN_DIR resumes from $RUN_DIR/checkpoints instead
#   4. export     tools/convert_to_hf.py     -> $RUN_DIR/hf (config.json carries elastic_moe)
#   5. k' sweep   tools/elastic_eval.py      on the held-out data -> $RUN_DIR/eval (table printed)
#
# Where it runs: inside a Slurm allocation (SLURM_JOB_ID set and srun found), steps 3 and 5 run
# one task per rank through launchers/slurm/pretrain.sbatch (logs in $RUN_DIR/logs/job-ID/; a
# preemption checkpoints, requeues the job, and the requeued job runs this script again and
# resumes), e.g.
#     RUN_DIR=/shared/ft/qwen sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \
#         launchers/finetune.sh /models/qwen3-moe /data/chat.jsonl parallel.expert_model_parallel_size=8
# Elsewhere they run through launchers/local.sh (NPROC processes; one on a CPU machine).
# SIGUSR1/SIGTERM to this script are forwarded to the running launcher (a checkpoint, then exit 75;
# the #SBATCH lines above send USR1 120 s before the time limit, as pretrain.sbatch does).
# Steps 1, 2 and 4 run as one process on the first node. Steps whose outputs exist are skipped
# (FRESH=1 redoes everything), so running the same command again finishes an interrupted run.
#
# Exit code: 0 done; 75 training stopped on a signal with a checkpoint (run again to resume);
# otherwise the failing step's (2 for a configuration or data error, with one line naming it).
#
# Environment knobs:
#   RUN_DIR        everything goes here [runs/finetune/<basename of HF_DIR>]
#   PROJECT_DIR    the repository, under sbatch [the submit directory]
#   RECIPE         fine-tune recipe [configs/finetune_emoe.yaml; configs/finetune_mmoe.yaml for M-MoE]
#   PYTHON         interpreter [active venv/conda python, else <repo>/.venv/bin/python, else python3]
#   NPROC          processes for steps 3 and 5 outside Slurm [launchers/local.sh's default: GPUs, else 1]
#   HOLDOUT_EVERY  hold out every N-th conversation of a jsonl DATA [20, i.e. 5%]
#   CHAT_TEMPLATE  Jinja chat template file, for a tokenizer without one (tools/preprocess_data.py)
#   VALID_DATA     held-out prefix when DATA is a prefix [none: data.split of the recipe]
#   KS             k' values of the sweep, e.g. 1-8 [tools/elastic_eval.py's default: 1..2*k_max]
#   EVAL_ITERS     global batches per k' [the recipe's train.eval_iters]
#   IMPORT_ARGS    extra tools/convert_from_hf.py options (word-split)
#   WORKERS        tokenizer processes of step 2 [cores, at most 8]
#   FRESH          1 = delete $RUN_DIR's imported model, data, checkpoints, export and sweep first [0]
# Paths must not contain spaces (the evaluation command is passed to the launchers as one string).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# Under sbatch the script runs from a spool copy: the repository is then PROJECT_DIR, else the
# submit directory (as for launchers/slurm/pretrain.sbatch).
if [[ ! -f $REPO/megatron_elastic/train.py ]]; then REPO=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$REPO}}; fi
[[ -f $REPO/megatron_elastic/train.py ]] || { echo "finetune.sh: error: $REPO is not the repository: set PROJECT_DIR" >&2; exit 2; }

say() { printf '\n==> [finetune.sh %s] %s\n' "$(date +%T)" "$*"; }
die() { echo "finetune.sh: error: $*" >&2; exit 2; }
usage() { sed -n '13,15p' "$REPO/launchers/finetune.sh" | sed 's/^# \{0,1\}//'; }

[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -ge 2 ]] || { usage >&2; die "needs HF_DIR and DATA"; }
HF_DIR=$(realpath -m "$1")
DATA=$(realpath -m "$2")
shift 2
OVERRIDES=("$@")
[[ -f $HF_DIR/config.json ]] || die "HF_DIR=$HF_DIR has no config.json: point at a Hugging Face model directory"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] && command -v python >/dev/null; then PYTHON=python
    elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
    else PYTHON=python3; fi
fi
export PYTHON
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=${WANDB_MODE:-disabled}
RUN=$(realpath -m "${RUN_DIR:-$REPO/runs/finetune/$(basename "$HF_DIR")}")
RECIPE=$(realpath -m "${RECIPE:-$REPO/configs/finetune_emoe.yaml}")
[[ -f $RECIPE ]] || die "RECIPE=$RECIPE not found (configs/finetune_emoe.yaml or configs/finetune_mmoe.yaml)"
IMPORTED=$RUN/imported
CKPT=$RUN/checkpoints
cd "$REPO"
if [[ ${FRESH:-0} == 1 ]]; then rm -rf "$IMPORTED" "$RUN/data" "$CKPT" "$RUN/hf" "$RUN/eval" "$RUN/finetune.yaml"; fi
mkdir -p "$RUN"

if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v srun >/dev/null; then
    export RUN_DIR=$RUN CKPT_DIR=$CKPT PROJECT_DIR=$REPO
    LAUNCH=(bash "$REPO/launchers/slurm/pretrain.sbatch")
    where="Slurm job $SLURM_JOB_ID, $SLURM_NTASKS task(s) via launchers/slurm/pretrain.sbatch"
else
    LAUNCH=(bash "$REPO/launchers/local.sh" ${NPROC:+-n "$NPROC"})
    where="this machine via launchers/local.sh${NPROC:+ -n $NPROC}"
fi
# Runs a launcher in the background so that SIGUSR1/SIGTERM reach it (bash defers traps while a
# foreground child runs); returns its exit code. A signal during another step stops the script
# once that step is done (the steps are atomic: a rerun continues from there).
child=""
forward() {
    if [[ -n $child ]]; then kill -"$1" "$child" 2>/dev/null; return 0; fi
    echo "finetune.sh: got SIG$1: stopped after the current step (run the same command again to continue)" >&2
    [[ $1 == USR1 ]] && exit 75
    exit 143
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
launch() {
    local rc
    "$@" &
    child=$!
    while :; do
        wait "$child" && rc=0 || rc=$?
        ((rc > 128)) && kill -0 "$child" 2>/dev/null && continue  # a trap ran; the child goes on
        break
    done
    child=""
    return "$rc"
}
say "run $RUN | model $HF_DIR | data $DATA | recipe $RECIPE | $where"

# --- 1: import ---------------------------------------------------------------------------------
say "1/5 import -> $IMPORTED"
if [[ -s $IMPORTED/latest_checkpointed_iteration.txt && -f $IMPORTED/megatron_config.yaml ]]; then
    echo "exists (FRESH=1 redoes it): skipped"
else
    read -r -a import_args <<<"${IMPORT_ARGS:-}"
    "$PYTHON" tools/convert_from_hf.py --hf-dir "$HF_DIR" --output "$IMPORTED" --overwrite --no-progress \
        "${import_args[@]}"
fi
TOKENIZER=$("$PYTHON" - "$IMPORTED/megatron_config.yaml" <<'EOF'
import sys
from megatron_elastic.config import load_config
print(load_config(sys.argv[1]).data.tokenizer_model or "")
EOF
)
[[ -n $TOKENIZER ]] || die "$HF_DIR has no tokenizer (tokenizer.json or tokenizer.model): add the model's tokenizer files"

# --- 2: data -----------------------------------------------------------------------------------
say "2/5 data"
if [[ -f $DATA ]]; then
    every=${HOLDOUT_EVERY:-20}
    [[ $every =~ ^[1-9][0-9]*$ && $every -ge 2 ]] || die "HOLDOUT_EVERY=$every must be an integer >= 2"
    TRAIN_PREFIX=$RUN/data/train_chat_document
    VALID_PREFIX=$RUN/data/heldout_chat_document
    if [[ -s $TRAIN_PREFIX.idx && -s $VALID_PREFIX.idx ]]; then
        echo "exists: skipped"
    else
        mkdir -p "$RUN/data"
        awk -v n="$every" 'NR % n == 0 { print > held; next } { print > train }' \
            held="$RUN/data/heldout.jsonl" train="$RUN/data/train.jsonl" "$DATA"
        [[ -s $RUN/data/heldout.jsonl ]] || die "$DATA has fewer than HOLDOUT_EVERY=$every lines: nothing to hold out"
        workers=${WORKERS:-$(nproc 2>/dev/null || echo 1)}
        ((workers > 8)) && workers=8
        template=(${CHAT_TEMPLATE:+--chat-template "$(realpath -m "$CHAT_TEMPLATE")"})
        for part in train heldout; do
            "$PYTHON" tools/preprocess_data.py --chat --input "$RUN/data/$part.jsonl" --tokenizer-model "$TOKENIZER" \
                --output-prefix "$RUN/data/$part" --workers "$workers" --no-progress "${template[@]}"
        done
    fi
    DATA_ARGS=("data.data_path=[$TRAIN_PREFIX]" "data.valid_data_path=[$VALID_PREFIX]")
elif [[ -f $DATA.bin && -f $DATA.idx ]]; then
    echo "preprocessed prefix: $DATA${VALID_DATA:+ (held out: $VALID_DATA)}"
    DATA_ARGS=("data.data_path=[$DATA]")
    [[ -n "${VALID_DATA:-}" ]] && DATA_ARGS+=("data.valid_data_path=[$(realpath -m "$VALID_DATA")]")
else
    die "DATA=$DATA is neither a chat jsonl file nor a preprocessed prefix ($DATA.bin/.idx)"
fi

# --- 3: fine-tune ------------------------------------------------------------------------------
# The run's recipe: the imported model's recipe as base, RECIPE's sections (its own base: chain
# resolved) on top; the command line below adds data, paths and the caller's overrides.
"$PYTHON" - "$IMPORTED/megatron_config.yaml" "$RECIPE" "$RUN/finetune.yaml" <<'EOF'
import sys
from pathlib import Path
import yaml
from megatron_elastic.config.recipes import read_recipe
imported, recipe, out = map(Path, sys.argv[1:4])
sections = read_recipe(recipe)
out.write_text(f"# launchers/finetune.sh: {recipe} on the model imported at {imported.parent}\n"
               + yaml.safe_dump({"base": str(imported), **sections}, sort_keys=False))
EOF
if [[ -s $CKPT/latest_checkpointed_iteration.txt ]]; then
    LOAD_ARGS=("checkpoint.load=$CKPT" "checkpoint.finetune=false")  # resume this fine-tune
else
    LOAD_ARGS=("checkpoint.load=$IMPORTED" "checkpoint.finetune=true")
fi
TRAIN_ARGS=("${DATA_ARGS[@]}" "data.tokenizer_model=$TOKENIZER" "${LOAD_ARGS[@]}" "checkpoint.save=$CKPT"
            "logging.tensorboard_dir=$RUN/tensorboard" "${OVERRIDES[@]}")
ITERS=$("$PYTHON" - "$RUN/finetune.yaml" "${TRAIN_ARGS[@]}" <<'EOF'
import sys
from megatron_elastic.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).train.train_iters)
except ConfigError as exc:
    print(f"finetune.sh: error: {exc}", file=sys.stderr)
    sys.exit(2)
EOF
) || exit 2
say "3/5 fine-tune to iteration $ITERS -> $CKPT (${LOAD_ARGS[*]})"
rc=0
LOAD_ARG="" launch "${LAUNCH[@]}" "$RUN/finetune.yaml" "${TRAIN_ARGS[@]}" || rc=$?
((rc == 0)) || { echo "finetune.sh: training exited with $rc" >&2; exit "$rc"; }
done_iters=$(cat "$CKPT/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
if ((done_iters < ITERS)); then
    echo "finetune.sh: training stopped at iteration $done_iters of $ITERS (checkpoint saved): run the same command again to resume" >&2
    exit 75
fi

# --- 4: export ---------------------------------------------------------------------------------
say "4/5 export -> $RUN/hf"
"$PYTHON" tools/convert_to_hf.py --load "$CKPT" --output "$RUN/hf" --overwrite --no-progress

# --- 5: k' sweep on the held-out data ----------------------------------------------------------
say "5/5 k' sweep on the held-out data -> $RUN/eval"
ITER_DIR=$CKPT/$(printf 'iter_%07d' "$done_iters")
EVAL=("tools/elastic_eval.py" --load "$CKPT" --output-dir "$RUN/eval" ${KS:+--ks "$KS"}
      ${EVAL_ITERS:+--eval-iters "$EVAL_ITERS"})
# The launchers add `--config CONFIG`: the run's own saved config, so the sweep reads the data
# and model exactly as training did.
ENTRYPOINT="${EVAL[*]}" SAVE_ARG="" LOAD_ARG="" launch "${LAUNCH[@]}" "$ITER_DIR/run_config.yaml"
[[ -s $RUN/eval/elastic_eval.txt ]] || die "the sweep wrote no $RUN/eval/elastic_eval.txt"
say "done: fine-tuned checkpoint $CKPT, Hugging Face model $RUN/hf, k' sweep $RUN/eval"
cat "$RUN/eval/elastic_eval.txt"
