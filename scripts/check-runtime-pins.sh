#!/usr/bin/env bash
# Checks that building any single workspace member reuses the workspace's build of
# the shared runtime (core/runtime pins the union of features; DESIGN rule 3).
# A member whose build recompiles llm-esr-runtime would relink
# libllm_esr_runtime.so and break every other binary with "undefined symbol".
set -euo pipefail
cd "$(dirname "$0")/.."

# The reference: the workspace build (a no-op when it is up to date).
cargo build --release --workspace --quiet

members=$(sed -n '/^members = \[/,/^\]/p' Cargo.toml | grep -o '"[^"]*"' | tr -d '"')
failed=()
for dir in $members; do
    pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)
    if cargo build --release --quiet -p "$pkg" --message-format=json 2>/dev/null |
        grep '"reason":"compiler-artifact"' | grep '"fresh":false' |
        grep -q '"name":"llm_esr_runtime"'; then
        failed+=("$pkg")
    fi
done

if ((${#failed[@]})); then
    echo "check-runtime-pins: building ${failed[*]} alone recompiled llm-esr-runtime:" >&2
    echo "  a dependency feature differs from the workspace build. Add the feature to" >&2
    echo "  the pins in core/runtime/Cargo.toml (compare 'cargo tree -e features -p <pkg>'" >&2
    echo "  with '--workspace'). Restoring the workspace build." >&2
    cargo build --release --workspace --quiet
    exit 1
fi
echo "check-runtime-pins: every member builds against the workspace's runtime"
