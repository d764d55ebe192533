#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions run via traps / torchrun bash -c
#
# megatron-elastic on ONE machine: torchrun, any number of processes, CPU or GPU.
#
#   launchers/local.sh [-n NPROC] CONFIG.yaml [section.key=value ...]
#
#   launchers/local.sh configs/smoke.yaml                      # 1 process (or 1 per GPU)
#   launchers/local.sh -n 2 configs/smoke.yaml parallel.expert_model_parallel_size=2
#   launchers/local.sh -n 8 configs/small.yaml parallel.expert_model_parallel_size=8
#   launchers/local.sh -n 4 configs/smoke.yaml parallel.pipeline_model_parallel_size=2 \
#       parallel.expert_model_parallel_size=2     # 2 stages x 2 expert ranks (DP 2)
#
# NPROC defaults to the number of visible GPUs (torch.cuda.device_count()),
# else 1. Every rank runs
#     $PYTHON $ENTRYPOINT --config CONFIG overrides...
# under `$PYTHON -m torch.distributed.run --standalone --nproc-per-node NPROC`
# (torchrun of the interpreter that runs the training, never a torchrun found
# on PATH that may belong to another environment). Paths in the config are
# relative to the current directory.
#
# Exit code: 0 = finished; 75 = every rank saved a checkpoint on SIGTERM/SIGUSR1
# and stopped ("run me again": the next start with the same checkpoint.load
# resumes); anything else = the exit code of the first rank that failed (2 for
# the entry point's environment/config checks), or torchrun's own.
#
# Stopping with a checkpoint: send SIGTERM or SIGUSR1 to THIS script
# (kill -TERM <pid of local.sh>, or to its process group). It forwards the
# signal to every rank's process group; the ranks finish their step, save and
# exit 75. torchrun runs in a session of its own and is not signalled, so it
# neither kills the ranks after its shutdown timeout nor prints a traceback.
# Signalling torchrun or the ranks directly (e.g. a cgroup-wide SIGTERM) works
# too: torchrun relays it to the ranks and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds (600 here unless set; torch versions without that variable wait 30 s)
# before SIGKILL, then exits 1 with a SignalException traceback; this script
# still exits 75 if every rank saved. Ctrl-C (SIGINT) aborts without a checkpoint.
#
# How the exit code survives torchrun: each rank runs in a small bash wrapper
# (rank_main below) that records the rank's exit code and the time it ended in a
# status directory and maps 75 -> 0 (torchrun treats any non-zero exit as a
# failure, kills the other ranks and always exits 1). This script then decides
# from those statuses.
#
# On failure: torchrun's ChildFailedError traceback is replaced by one line, and
# this script names the rank that failed FIRST (by the time its exit was
# recorded; a rank killed by a signal shows as e.g. "killed by SIGKILL") with the
# first error line that rank printed ("error [rank N]: ..." from the entry
# point's checks, else the last exception line of its traceback), e.g.
#   FAILED: rank 1 exited with 2 (first to fail; torchrun exit 1): error [rank 1]: ...
# The other ranks were stopped by torchrun (exit 143) or failed because their
# peer was gone; their own lines stay above in the output.
#
# Environment knobs:
#   PYTHON          interpreter [$VIRTUAL_ENV/$CONDA_PREFIX python if one is
#                   active, else <repo>/.venv/bin/python if present, else python3]
#   ENTRYPOINT      what follows $PYTHON [-m megatron_elastic.train] (word-split)
#   OMP_NUM_THREADS threads per rank [CPU cores / NPROC, at least 1]
#   TORCHRUN_ARGS   extra torchrun options (word-split), e.g.
#                   "--log-dir runs/x/torchrun --tee 3" for per-rank log files
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  see above [600]
#   MEGATRON_ELASTIC_TIMEOUT_S  collective timeout in seconds (overrides
#                   parallel.distributed_timeout_minutes): how long a rank waits
#                   for a peer that hangs before it fails
set -uo pipefail

REQUEUE_EXIT_CODE=75
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

log() { echo "[local.sh $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }
usage() {
    sed -n '3,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

NPROC=""
while (($#)); do
    case $1 in
        -n | --nproc | --nproc-per-node)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            NPROC=$2
            shift 2
            ;;
        -n[0-9]*) NPROC=${1#-n}; shift ;;
        --nproc=* | --nproc-per-node=*) NPROC=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG"; }
CONFIG=$1
shift
OVERRIDES=("$@")

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] && command -v python >/dev/null; then
        PYTHON=python
    elif [[ -x $REPO/.venv/bin/python ]]; then
        PYTHON=$REPO/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
ENTRYPOINT=${ENTRYPOINT:--m megatron_elastic.train}
# The package is importable from any working directory, installed or not.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [[ -z $NPROC ]]; then
    NPROC=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
        ((ngpu > 0)) && NPROC=$ngpu
    fi
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$((cores / NPROC))
    ((OMP_NUM_THREADS < 1)) && OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}

STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/local-launch.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$STATUS_DIR"' EXIT
export LOCAL_LAUNCH_STATUS_DIR=$STATUS_DIR
export REQUEUE_EXIT_CODE

read -r -a ENTRY <<<"$ENTRYPOINT"
CMD=("$PYTHON" "${ENTRY[@]}" --config "$CONFIG" "${OVERRIDES[@]}")

# Runs as every rank (torchrun --no-python bash -c ...). torchrun starts each
# rank in its own session and signals it with killpg, so the training process
# (same process group as this wrapper) gets torchrun's signals directly; the
# no-op traps only keep the wrapper alive until the child has exited (bash runs
# a trap after the foreground child ends). The pgid file lets local.sh signal
# the whole rank the same way.
rank_main() {
    local dir=$LOCAL_LAUNCH_STATUS_DIR rc
    # A copy of the rank's stderr for the failure report. The copier starts while the stop
    # signals are ignored (an ignored disposition survives exec), so a signal to the rank's
    # process group never cuts off what the rank prints while it stops.
    trap '' TERM USR1 INT HUP
    exec 2> >(tee -a "$dir/rank-$RANK.err" >&2)
    trap ':' TERM USR1 INT HUP
    # (not $$: torchrun substitutes ${local_rank}-style macros, turning "$$" into "$")
    echo "$BASHPID" >"$dir/rank-$RANK.pgid"
    "$@"
    rc=$?
    echo "$rc $(date +%s.%N)" >"$dir/rank-$RANK.exit.tmp" && mv "$dir/rank-$RANK.exit.tmp" "$dir/rank-$RANK.exit"
    ((rc == REQUEUE_EXIT_CODE)) && exit 0  # not a failure: keep torchrun from killing peers
    exit "$rc"
}
RANK_SCRIPT="$(declare -f rank_main)
rank_main \"\$@\""

# torchrun itself (torch.distributed.run's main), minus the ChildFailedError traceback it
# prints when a rank fails: this script reports the failure from the ranks' own statuses.
TORCHRUN_PY='import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as exc:
    rank, failure = exc.get_first_failure()
    print(f"torchrun: rank {rank} failed first (exit code {failure.exitcode}); stopped the others",
          file=sys.stderr)
    sys.exit(1)'
TORCHRUN=("$PYTHON" -c "$TORCHRUN_PY" --standalone --nproc-per-node "$NPROC" --max-restarts 0)
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a _extra <<<"$TORCHRUN_ARGS"
    TORCHRUN+=("${_extra[@]}")
fi
TORCHRUN+=(--no-python bash -c "$RANK_SCRIPT" rank_main "${CMD[@]}")

log "nproc=$NPROC OMP_NUM_THREADS=$OMP_NUM_THREADS python=$PYTHON"
log "cmd: ${CMD[*]}"

torchrun_pid=""
forward() {  # forward SIG to every running rank's process group (not to torchrun)
    local sig=$1 f pgid n=0 started=0
    for f in "$STATUS_DIR"/rank-*.pgid; do
        [[ -s $f ]] || continue
        started=$((started + 1))
        pgid=$(<"$f")
        [[ -e $STATUS_DIR/$(basename "$f" .pgid).exit ]] && continue
        kill -"$sig" -- "-$pgid" 2>/dev/null && n=$((n + 1))
    done
    if ((started == 0)) && [[ -n $torchrun_pid ]]; then
        log "got SIG$sig before the ranks started: stopping torchrun (no checkpoint)"
        kill -TERM "$torchrun_pid" 2>/dev/null
    else
        log "got SIG$sig: forwarded to $n rank(s); they checkpoint and exit $REQUEUE_EXIT_CODE"
    fi
}
on_int() {
    log "got SIGINT: aborting the ranks (no checkpoint; use SIGTERM/SIGUSR1 for one)"
    [[ -n $torchrun_pid ]] && kill -INT "$torchrun_pid" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap on_int INT

# torchrun gets its own session: a SIGTERM to this script's process group (what
# `timeout`, CI runners and shells send) then reaches only this script, which
# forwards it to the ranks; torchrun sees them finish and exits normally.
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
"${SETSID[@]}" "${TORCHRUN[@]}" &
torchrun_pid=$!
while :; do
    wait "$torchrun_pid"
    torchrun_rc=$?
    ((torchrun_rc > 128)) && kill -0 "$torchrun_pid" 2>/dev/null && continue  # a trap ran
    break
done

# --- outcome, from the per-rank exit codes ------------------------------------
n_ok=0 n_requeue=0 first_fail="" first_fail_rc="" first_fail_time=""
for ((r = 0; r < NPROC; r++)); do
    f=$STATUS_DIR/rank-$r.exit
    rc="" when=""
    [[ -s $f ]] && read -r rc when <"$f"
    case $rc in
        0) n_ok=$((n_ok + 1)) ;;
        "$REQUEUE_EXIT_CODE") n_requeue=$((n_requeue + 1)) ;;
        "") ;;
        *) if [[ -z $first_fail ]] || awk -v a="$when" -v b="$first_fail_time" 'BEGIN { exit !(a < b) }'; then
               first_fail=$r first_fail_rc=$rc first_fail_time=$when
           fi ;;
    esac
done

# How rank $1 ended, in words: "exited with 2", "was killed by SIGKILL (exit 137)".
describe_exit() {
    local rc=$1 name
    if ((rc > 128)) && name=$(kill -l "$((rc - 128))" 2>/dev/null); then
        echo "was killed by SIG$name (exit $rc)"
    else
        echo "exited with $rc"
    fi
}
# The first error line rank $1 printed: the entry point's "error [rank N]: ..." line, else the
# last line of a Python traceback ("SomeError: ..."), else nothing.
first_error_line() {
    local f=$STATUS_DIR/rank-$1.err line
    [[ -s $f ]] || return 0
    line=$(grep -m1 -E '^error( \[rank [0-9]+\])?: ' "$f")
    [[ -n $line ]] || line=$(grep -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception|Interrupt)(: |$)' "$f" | tail -n 1)
    printf '%s' "${line:0:600}"
}

if ((n_requeue > 0 && n_ok + n_requeue == NPROC)); then
    log "all ranks stopped after saving a checkpoint: exit $REQUEUE_EXIT_CODE (run again to resume)"
    exit "$REQUEUE_EXIT_CODE"
fi
if ((n_ok == NPROC)); then
    ((torchrun_rc == 0)) || log "all ranks finished (torchrun exited with $torchrun_rc)"
    exit 0
fi
if [[ -n $first_fail ]]; then
    why=$(first_error_line "$first_fail")
    log "FAILED: rank $first_fail $(describe_exit "$first_fail_rc") (first to fail; torchrun exit $torchrun_rc)${why:+: $why}"
    exit "$first_fail_rc"
fi
log "FAILED: torchrun exited with $torchrun_rc ($((NPROC - n_ok - n_requeue)) rank(s) left no exit code: killed or never started)"
((torchrun_rc != 0)) && exit "$torchrun_rc"
exit 1
