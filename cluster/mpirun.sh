#!/usr/bin/env bash
# Runs `llm-esr-orch train CONFIG [ARGS...]` data-parallel on N ranks with Open
# MPI's mpirun. See cluster/README.md. Examples:
#
#   cluster/mpirun.sh -n 4 configs/beauty5_sasrec.yaml
#   cluster/mpirun.sh -n 8 -f cluster/hostfile --per-node 4 --threads 8 \
#       configs/beauty5_sasrec.yaml --set train.epochs=50 --resume
#   cluster/mpirun.sh -n 2 --dry-run configs/beauty5_tiny_sasrec.yaml
set -euo pipefail

usage() {
    cat <<'EOF'
usage: cluster/mpirun.sh [OPTIONS] CONFIG [ORCHESTRATOR ARGS...]

Starts `llm-esr-orch train CONFIG ORCHESTRATOR-ARGS...` on N MPI ranks.
Everything after CONFIG goes to the orchestrator (--set key=value, --resume).

options:
  -n, --ranks N        number of ranks (default: $RANKS, else 2)
  -f, --hostfile FILE  Open MPI hostfile (see cluster/hostfile.example)
      --per-node N     ranks per node (mpirun --map-by ppr:N:node)
      --threads N      compute threads per rank (RAYON_NUM_THREADS); default
                       without a hostfile: cores of this machine / ranks
      --bind POLICY    mpirun --bind-to POLICY (default: none)
      --oversubscribe  allow more ranks than slots (mpirun --oversubscribe)
  -b, --bin PATH       orchestrator binary (default: $LLM_ESR_BIN, else
                       <repo>/target/release/llm-esr-orch)
      --mpirun PATH    mpirun to use (default: $MPIRUN, else mpirun)
      --mpi-arg ARG    one more argument for mpirun (repeatable)
      --dry-run        print the command instead of running it
  -h, --help           this text
EOF
}

die() {
    echo "mpirun.sh: $*" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

ranks=${RANKS:-2}
hostfile=""
per_node=""
threads=""
bind="none"
oversubscribe=0
bin=${LLM_ESR_BIN:-$root/target/release/llm-esr-orch}
mpirun=${MPIRUN:-mpirun}
dry_run=0
mpi_args=()

while [ $# -gt 0 ]; do
    case "$1" in
        -n | --ranks | -f | --hostfile | --per-node | --threads | --bind | -b | --bin | --mpirun | --mpi-arg)
            [ $# -ge 2 ] || die "option $1 needs a value"
            case "$1" in
                -n | --ranks) ranks=$2 ;;
                -f | --hostfile) hostfile=$2 ;;
                --per-node) per_node=$2 ;;
                --threads) threads=$2 ;;
                --bind) bind=$2 ;;
                -b | --bin) bin=$2 ;;
                --mpirun) mpirun=$2 ;;
                --mpi-arg) mpi_args+=("$2") ;;
            esac
            shift 2
            ;;
        --oversubscribe) oversubscribe=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (orchestrator options go after CONFIG; see --help)" ;;
        *) break ;;
    esac
done

[ $# -ge 1 ] || { usage >&2; exit 2; }
config=$1
shift

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_count "$ranks" || die "--ranks must be a positive integer, got '$ranks'"
[ -z "$per_node" ] || is_count "$per_node" || die "--per-node must be a positive integer, got '$per_node'"
[ -z "$threads" ] || is_count "$threads" || die "--threads must be a positive integer, got '$threads'"
[ -f "$config" ] || die "config file '$config' not found (paths are relative to $(pwd), which is also the ranks' working directory)"
[ -z "$hostfile" ] || [ -f "$hostfile" ] || die "hostfile '$hostfile' not found"
if [ "$dry_run" = 0 ]; then
    [ -x "$bin" ] || die "'$bin' is not an executable: build it first (cargo build --release) or pass --bin"
    command -v "$mpirun" >/dev/null || die "'$mpirun' not found: load the cluster's MPI module or pass --mpirun"
fi

# Open MPI refuses to run as root unless told twice; only set this for root.
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# Threads per rank. candle's element-wise pool spin-waits while idle, so one
# thread for it (CANDLE_NUM_THREADS=1; the orchestrator also defaults to that)
# is fastest when several ranks share a node. Its matrix products use a rayon
# pool sized by RAYON_NUM_THREADS (default: all physical cores), which must be
# split between the ranks of a node, or N ranks each start one thread per core.
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1}
if [ -n "$threads" ]; then
    export RAYON_NUM_THREADS=$threads
elif [ -z "${RAYON_NUM_THREADS:-}" ] && [ -z "$hostfile" ]; then
    cores=$(nproc 2>/dev/null || echo 1)
    export RAYON_NUM_THREADS=$((cores / ranks > 0 ? cores / ranks : 1))
fi

cmd=("$mpirun" -np "$ranks")
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$per_node" ] || cmd+=(--map-by "ppr:$per_node:node")
# Each rank runs several threads: binding a rank to one core (Open MPI's default
# for 2 ranks or fewer) would put all of them on that core.
cmd+=(--bind-to "$bind")
[ "$oversubscribe" = 0 ] || cmd+=(--oversubscribe)

# mpirun passes its environment to local ranks only; -x exports a variable to
# ranks on other nodes as well.
forward=(CANDLE_NUM_THREADS RAYON_NUM_THREADS RUST_LOG RUST_BACKTRACE PATH LD_LIBRARY_PATH)
while IFS= read -r name; do
    forward+=("$name")
done < <(compgen -e | grep '^LLM_ESR_' || true)
for name in "${forward[@]}"; do
    if [ -n "${!name+x}" ]; then
        cmd+=(-x "$name")
    fi
done

cmd+=("${mpi_args[@]}" "$bin" train "$config" "$@")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
echo "mpirun.sh: ${cmd[*]}" >&2
exec "${cmd[@]}"
