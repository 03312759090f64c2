#!/usr/bin/env bash
# The test command: set-up, one release build of the whole workspace (the
# tests load its plugins and run its binary), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Open MPI refuses root without these; the mpirun tests need them in CI.
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"
cargo build --release --workspace
bash scripts/check-runtime-pins.sh
cargo test --release --workspace -- --test-threads=2
