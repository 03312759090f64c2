#!/usr/bin/env bash
# Train the same beauty5_tiny experiments with two revisions and compare their
# numbers: the check that a refactor did not move results.
#
#   bash scripts/compare-runs.sh [--reference REV] [--candidate REV] [--epochs N]
#                                [--out DIR] [--only RUN,...] [--fresh] [--no-seed]
#                                [--metric-tol X] [--loss-rtol X]
#
#   --reference REV   default 4bcc782 (the commit before the reliability changes)
#   --candidate REV   default HEAD (of this checkout; committed state only, local
#                     changes are not included: commit them on a branch first)
#   --epochs N        train.epochs of every run (default 2)
#   --out DIR         work directory (default /tmp/compare-runs), reused between
#                     invocations so a rerun is incremental:
#                       src-<sha7>/      git worktree of each revision (detached)
#                       target-<sha7>/   its cargo target dir (release build)
#                       artifacts/       embed output (reference binary, real encoder)
#                       runs-<sha7>-e<N>/<run>/   run directories
#                       logs/            build, embed and train logs
#                       compare.md, compare.json  the result
#   --only RUN,...    a subset of the runs below
#   --fresh           retrain runs that already have results.json (the builds and
#                     the artifacts are still reused)
#   --no-seed         build the candidate from scratch instead of starting its
#                     target dir from a copy of the reference's (the copy lets
#                     cargo reuse the compiled dependencies; the workspace crates
#                     are rebuilt anyway as their paths differ)
#   --metric-tol X    absolute tolerance of every metric (default 1e-6)
#   --loss-rtol X     relative tolerance of the per-epoch loss (default 1e-5)
#
# Runs (seed 42, CANDLE_NUM_THREADS=1, data $LLM_ESR_DATA/beauty5_tiny, the
# same artifact directory for both revisions):
#   sasrec, bert4rec, gru4rec   plain backbones (configs/beauty5_tiny_sasrec.yaml)
#   llminit                     LLMInit SASRec (configs/beauty5_tiny_llmesr.yaml, variant llminit)
#   llmesr                      LLM-ESR SASRec with distillation (configs/beauty5_tiny_llmesr.yaml)
#   wo_co wo_se wo_sd wo_share wo_ca   the five ablations of llmesr
# Each revision trains with its own configs/ and binary. A run whose
# results.json exists is skipped (unless --fresh); a half-finished run
# directory is removed and trained again.
#
# Comparison (scripts/compare_runs.py, needs python3): every numeric leaf of
# results.json valid/test and of the per-epoch valid metrics within --metric-tol,
# per-epoch loss within --loss-rtol relative, best_epoch and epochs_run equal,
# the other results.json keys equal except timings; keys present on one side only
# (outside valid/test) are notes, not failures. Exit 0 only if every run passes;
# 1 when a run differs or failed; 2 for a usage error.
#
# Needs git, cargo (the toolchain of the revisions), python3, and the
# beauty5_tiny data and all-MiniLM-L6-v2 encoder (scripts/env.sh finds them in
# ../shared). Both revisions must be in this checkout's repository. Two clean
# release builds take 10-30 minutes on two cores; the embed about a minute;
# each 2-epoch run seconds to a minute.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

reference=4bcc782
candidate=HEAD
epochs=2
out=/tmp/compare-runs
only=""
fresh=0
seed_target=1
metric_tol=1e-6
loss_rtol=1e-5
ALL_RUNS=(sasrec bert4rec gru4rec llminit llmesr wo_co wo_se wo_sd wo_share wo_ca)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { printf 'compare-runs: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'compare-runs: %s (see --help)\n' "$*" >&2; exit 2; }
log() { printf '[compare-runs %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --reference|--candidate|--epochs|--out|--only|--metric-tol|--loss-rtol)
            [ $# -ge 2 ] && [ -n "$2" ] || usage_error "$1 needs a value"
            case "$1" in
                --reference) reference="$2" ;;
                --candidate) candidate="$2" ;;
                --epochs) epochs="$2" ;;
                --out) out="$2" ;;
                --only) only="$2" ;;
                --metric-tol) metric_tol="$2" ;;
                --loss-rtol) loss_rtol="$2" ;;
            esac
            shift 2 ;;
        --reference=*) reference="${1#*=}"; shift ;;
        --candidate=*) candidate="${1#*=}"; shift ;;
        --epochs=*) epochs="${1#*=}"; shift ;;
        --out=*) out="${1#*=}"; shift ;;
        --only=*) only="${1#*=}"; shift ;;
        --metric-tol=*) metric_tol="${1#*=}"; shift ;;
        --loss-rtol=*) loss_rtol="${1#*=}"; shift ;;
        --fresh) fresh=1; shift ;;
        --no-seed) seed_target=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

[[ "$epochs" =~ ^[1-9][0-9]*$ ]] || usage_error "--epochs must be a positive integer, got '$epochs'"
for t in "$metric_tol" "$loss_rtol"; do
    [[ "$t" =~ ^[0-9.]+([eE][-+]?[0-9]+)?$ ]] || usage_error "tolerance must be a non-negative number, got '$t'"
done
runs=()
if [ -n "$only" ]; then
    IFS=, read -r -a runs <<<"$only"
    for r in "${runs[@]}"; do
        [[ " ${ALL_RUNS[*]} " == *" $r "* ]] || usage_error "unknown run '$r' in --only (runs: ${ALL_RUNS[*]})"
    done
else
    runs=("${ALL_RUNS[@]}")
fi

# Tools, checked before any long step.
command -v git >/dev/null || die "git not found"
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) or put cargo on PATH"
if ! command -v python3 >/dev/null; then
    die "python3 not found: the comparison (scripts/compare_runs.py, standard library only) needs it; install it first (Debian/Ubuntu: apt-get install -y python3)"
fi
[ -f "$here/compare_runs.py" ] || die "$here/compare_runs.py is missing (it comes with this script)"

resolve() { # REV -> full sha
    git -C "$repo" rev-parse --verify --quiet "$1^{commit}" \
        || die "revision '$1' not found in $repo (fetch it, or give a commit, tag or branch name)"
}
ref_sha="$(resolve "$reference")"
cand_sha="$(resolve "$candidate")"
ref_short="$(git -C "$repo" rev-parse --short=7 "$ref_sha")"
cand_short="$(git -C "$repo" rev-parse --short=7 "$cand_sha")"

mkdir -p "$out" || die "cannot create $out"
out="$(cd "$out" && pwd)"
mkdir -p "$out/logs"

# One invocation per work directory at a time.
if command -v flock >/dev/null; then
    exec 9>"$out/.lock"
    flock -n 9 || die "another compare-runs is working in $out (lock $out/.lock)"
fi

# Data and encoder: scripts/env.sh sets LLM_ESR_DATA / LLM_ESR_MODELS (../shared
# beside this checkout, else the cache). The worktrees under $out have no
# ../shared beside them, so the paths are passed explicitly.
# shellcheck source=env.sh
source "$here/env.sh"
data="$LLM_ESR_DATA/beauty5_tiny"
[ -f "$data/inter.txt" ] || die "dataset not found: $data/inter.txt (set LLM_ESR_DATA to the directory holding beauty5_tiny, or put ../shared beside the checkout)"
[ -f "$LLM_ESR_MODELS/all-MiniLM-L6-v2/model.safetensors" ] \
    || die "encoder not found: $LLM_ESR_MODELS/all-MiniLM-L6-v2 (set LLM_ESR_MODELS)"
export LLM_ESR_DATA LLM_ESR_MODELS
export CANDLE_NUM_THREADS=1

t_all=$SECONDS
timings=()
timed() { timings+=("$1: $2 s"); }

log "reference $reference = $ref_sha"
log "candidate $candidate = $cand_sha"
log "work dir $out; epochs $epochs; runs: ${runs[*]}"

checkout() { # sha short -> worktree path on stdout
    local sha="$1" short="$2" dir="$out/src-$2"
    if [ -e "$dir" ]; then
        local top head
        top="$(git -C "$dir" rev-parse --show-toplevel 2>/dev/null || true)"
        [ "$top" = "$dir" ] || die "$dir exists but is not a git worktree; remove it"
        head="$(git -C "$dir" rev-parse HEAD)"
        [ "$head" = "$sha" ] || die "$dir is at $head, expected $sha; remove it (git -C $repo worktree remove --force $dir)"
        [ -z "$(git -C "$dir" status --porcelain --untracked-files=no)" ] \
            || die "$dir has local changes; remove it (git -C $repo worktree remove --force $dir)"
        log "reusing worktree $dir" 
    else
        local force=()
        # Registered but deleted (e.g. $out was cleaned): add over it.
        if git -C "$repo" worktree list --porcelain | grep -qxF "worktree $dir"; then force=(--force); fi
        git -C "$repo" worktree add "${force[@]}" --detach "$dir" "$sha" >"$out/logs/worktree-$short.log" 2>&1 \
            || die "git worktree add $dir $sha failed; see $out/logs/worktree-$short.log"
        log "worktree $dir at $short"
    fi
    echo "$dir"
}

build() { # short src [seed target dir]
    local short="$1" src="$2" seed="${3:-}" tgt="$out/target-$1" blog="$out/logs/build-$1.log" t0=$SECONDS
    if [ ! -d "$tgt" ] && [ -n "$seed" ] && [ -d "$seed/release/deps" ]; then
        log "seeding $tgt from $seed (compiled dependencies are reused)"
        rm -rf "$tgt.seeding"
        cp -a "$seed" "$tgt.seeding" || die "copying $seed to $tgt.seeding failed"
        # Drop the other revision's binaries and plugins; cargo puts this one's there.
        find "$tgt.seeding/release" -maxdepth 1 -type f -delete
        mv "$tgt.seeding" "$tgt"
    fi
    log "building $short: cargo build --release --workspace (target $tgt, log $blog)"
    if ! (cd "$src" && CARGO_TARGET_DIR="$tgt" cargo build --release --workspace) >"$blog" 2>&1; then
        tail -n 25 "$blog" >&2
        die "build of $short failed; full log: $blog"
    fi
    [ -x "$tgt/release/llm-esr-orch" ] || die "build of $short produced no $tgt/release/llm-esr-orch; see $blog"
    log "built $short in $((SECONDS - t0)) s"
    timed "build $short" $((SECONDS - t0))
}

ref_src="$(checkout "$ref_sha" "$ref_short")"
cand_src="$(checkout "$cand_sha" "$cand_short")"
build "$ref_short" "$ref_src"
if [ "$cand_sha" != "$ref_sha" ]; then
    seed=""
    [ "$seed_target" = 1 ] && seed="$out/target-$ref_short"
    build "$cand_short" "$cand_src" "$seed"
fi
ref_bin="$out/target-$ref_short/release/llm-esr-orch"
cand_bin="$out/target-$cand_short/release/llm-esr-orch"

# Artifacts, once, with the reference binary; both sides read the same files.
art="$out/artifacts"
t0=$SECONDS
log "embed (reference binary, $LLM_ESR_MODELS/all-MiniLM-L6-v2) -> $art (log $out/logs/embed.log)"
if ! (cd "$ref_src" && "$ref_bin" embed configs/beauty5_tiny_llmesr.yaml \
        --set "data.dir=$data" --set "model.artifacts=$art") >"$out/logs/embed.log" 2>&1; then
    tail -n 25 "$out/logs/embed.log" >&2
    die "embed failed; full log: $out/logs/embed.log"
fi
timed "embed" $((SECONDS - t0))
art_stamp="$(cd "$art" && find . -maxdepth 1 -type f ! -name manifest.json ! -name '.*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)"
if [ -f "$out/artifacts.sha256" ] && [ "$(cat "$out/artifacts.sha256")" != "$art_stamp" ]; then
    log "the artifacts changed since the last invocation: earlier runs are void, retraining"
    fresh=1
fi
echo "$art_stamp" >"$out/artifacts.sha256"

run_spec() { # run -> sets globals: cfg, sets (array)
    local llm=configs/beauty5_tiny_llmesr.yaml
    sets=()
    case "$1" in
        sasrec) cfg=configs/beauty5_tiny_sasrec.yaml ;;
        bert4rec) cfg=configs/beauty5_tiny_sasrec.yaml; sets=(model.backbone=bert4rec 'model.encoder={}') ;;
        gru4rec) cfg=configs/beauty5_tiny_sasrec.yaml; sets=(model.backbone=gru4rec 'model.encoder={}') ;;
        llminit) cfg=$llm; sets=(model.variant=llminit) ;;
        llmesr) cfg=$llm; sets=(model.distill=true) ;;
        wo_co) cfg=$llm; sets=(model.co_view=false) ;;
        wo_se) cfg=$llm; sets=(model.se_view=false) ;;
        wo_sd) cfg=$llm; sets=(model.distill=false) ;;
        wo_share) cfg=$llm; sets=(model.share_encoder=false) ;;
        wo_ca) cfg=$llm; sets=(model.cross_attention=false) ;;
        *) die "internal: unknown run $1" ;;
    esac
    [ "$cfg" = "$llm" ] && sets+=("model.artifacts=$art")
    return 0
}

ref_runs="$out/runs-$ref_short-e$epochs"
cand_runs="$out/runs-$cand_short-e$epochs"
# The same revision on both sides: a determinism check (trains twice).
[ "$cand_sha" = "$ref_sha" ] && cand_runs="$out/runs-$cand_short-e$epochs-again"
mkdir -p "$ref_runs" "$cand_runs"

failed_runs=()
total=$((2 * ${#runs[@]}))
n=0
train_side() { # label short bin src rundir
    local label="$1" short="$2" bin="$3" src="$4" rdir="$5" run t0 rlog
    for run in "${runs[@]}"; do
        n=$((n + 1))
        if [ -f "$rdir/$run/results.json" ] && [ "$fresh" = 0 ]; then
            log "[$n/$total] $label $run: done before, skipped (--fresh retrains)"
            continue
        fi
        rm -rf "${rdir:?}/$run"
        run_spec "$run"
        rlog="$out/logs/train-$(basename "$rdir")-$run.log"
        local args=(train "$cfg" --set seed=42 --set "train.epochs=$epochs" --set "data.dir=$data"
                    --set "output_dir=$rdir" --set "name=$run")
        local s
        for s in "${sets[@]}"; do args+=(--set "$s"); done
        t0=$SECONDS
        if (cd "$src" && "$bin" "${args[@]}") >"$rlog" 2>&1; then
            log "[$n/$total] $label $run: $((SECONDS - t0)) s"
        else
            log "[$n/$total] $label $run: FAILED after $((SECONDS - t0)) s; log $rlog"
            tail -n 5 "$rlog" >&2
            failed_runs+=("$label/$run")
        fi
    done
}

t0=$SECONDS
train_side "$ref_short" "$ref_short" "$ref_bin" "$ref_src" "$ref_runs"
timed "train $ref_short (${#runs[@]} runs)" $((SECONDS - t0))
t0=$SECONDS
train_side "$cand_short" "$cand_short" "$cand_bin" "$cand_src" "$cand_runs"
timed "train $cand_short (${#runs[@]} runs)" $((SECONDS - t0))

log "comparing $ref_runs with $cand_runs"
runs_csv="$(IFS=,; echo "${runs[*]}")"
status=0
python3 "$here/compare_runs.py" \
    --reference "$ref_runs" --candidate "$cand_runs" \
    --reference-label "$reference ($ref_short)" --candidate-label "$candidate ($cand_short)" \
    --runs "$runs_csv" --metric-tol "$metric_tol" --loss-rtol "$loss_rtol" \
    --markdown "$out/compare.md" --json "$out/compare.json" || status=$?
[ "$status" -le 1 ] || die "compare_runs.py failed (exit $status)"

timed "total" $((SECONDS - t_all))
{
    echo
    echo "Epochs $epochs, seed 42, CANDLE_NUM_THREADS=1, data $data, artifacts $art."
    if [ ${#failed_runs[@]} -gt 0 ]; then echo "Runs that failed to train: ${failed_runs[*]} (logs in $out/logs)."; fi
    echo "Wall times (this invocation): $(IFS=';'; echo "${timings[*]}" | sed 's/;/; /g')."
} | tee -a "$out/compare.md"

if [ "$status" -ne 0 ] || [ ${#failed_runs[@]} -gt 0 ]; then
    log "FAIL: see $out/compare.md"
    exit 1
fi
log "all runs match: $out/compare.md"
