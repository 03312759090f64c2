#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages that building and testing llm-esr-orch
# need, each checked by what the build actually uses (not by a package name or
# a loose file glob), and installs exactly the missing ones with apt-get (as
# root, or through sudo). Idempotent: does nothing when nothing is missing.
#
#   bash scripts/setup.sh          check, install what is missing, check again
#   bash scripts/setup.sh --check  only print the missing packages, one a line
#                                  ("nothing missing"); exit 1 if any, else 0
#
# LLM_ESR_SETUP_ROOT=DIR (for tests/tests/setup_check.rs): every file is looked
# for under DIR, and the commands only in DIR/usr/bin and DIR/bin.
set -euo pipefail
shopt -s nullglob
R="${LLM_ESR_SETUP_ROOT:-}"
here="$(cd "$(dirname "$0")/.." && pwd)"

# cmd NAME: the path of the command NAME (or of an absolute NAME).
cmd() {
    if [ -z "$R" ]; then command -v "$1"; return; fi
    case "$1" in /*) [ -x "$R$1" ] && echo "$R$1"; return;; esac
    local d
    for d in "$R/usr/bin" "$R/bin"; do [ -x "$d/$1" ] && { echo "$d/$1"; return 0; }; done
    return 1
}

# mpi-sys runs bindgen with the `runtime` feature: clang-sys 1.9 dlopens a
# file named libclang.so, libclang.so.*, libclang-*.so or libclang-*.so.*,
# skipping names with "-cpp." (libclang-cpp.so.14, a different library that
# stock images carry through libclang-cpp14: issue 9). It looks only in
# $LIBCLANG_PATH when that is set, else in LD_LIBRARY_PATH, LIBRARY_PATH and
# the directories below (clang-sys build/common.rs, DIRECTORIES_LINUX).
libclang_name() {
    case "$1" in *-cpp.*) return 1;; libclang.so|libclang.so.*|libclang-*.so|libclang-*.so.*) return 0;; esac
    return 1
}
have_libclang() {
    local dirs=() d f
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        [ -f "$R$LIBCLANG_PATH" ] && { libclang_name "${LIBCLANG_PATH##*/}"; return; }
        dirs=("$R$LIBCLANG_PATH")
    else
        IFS=: read -ra d <<<"${LD_LIBRARY_PATH:-}:${LIBRARY_PATH:-}"
        for f in "${d[@]}"; do [ -n "$f" ] && dirs+=("$R$f"); done
        dirs+=("$R"/usr/local/llvm*/lib* "$R"/usr/local/lib*/*/* "$R"/usr/local/lib*/* "$R"/usr/local/lib*
               "$R"/usr/lib*/*/* "$R"/usr/lib*/* "$R"/usr/lib*)
    fi
    for d in "${dirs[@]}"; do
        for f in "$d"/libclang*.so*; do [ -e "$f" ] && libclang_name "${f##*/}" && return 0; done
    done
    return 1
}
# libclang finds its builtin headers (stddef.h, which mpi.h includes) in
# <llvm>/lib/clang/<version>/include; libclang1-14 alone lacks them.
have_clang_headers() { local f; for f in "$R"/usr/lib/llvm-*/lib/clang/*/include/stddef.h; do return 0; done; return 1; }

# build-probe-mpi runs `$MPICC -show` (default mpicc) and hands its -I
# directories to bindgen, which parses mpi.h; mpi-sys compiles its C shim with
# that mpicc. On Debian, mpicc's wrapper data and mpi.h are libopenmpi-dev's.
have_mpi_dev() {
    local mpicc show inc
    mpicc="$(cmd "${MPICC:-mpicc}")" || return 1
    show="$("$mpicc" -show 2>/dev/null)" && [ -n "$show" ] || return 1
    for inc in $(printf '%s\n' $show | sed -n 's/^-I//p') /usr/include /usr/lib/x86_64-linux-gnu/openmpi/include; do
        [ -f "$R$inc/mpi.h" ] && return 0
    done
    return 1
}

runs() { local c; c="$(cmd "$1")" && "$c" "${@:2}" >/dev/null 2>&1; }

missing=()
want() { [[ " ${missing[*]} " == *" $1 "* ]] || missing+=("$1"); }
check() {
    missing=()
    have_libclang && have_clang_headers || want libclang-dev
    have_mpi_dev || want libopenmpi-dev
    # The mpirun tests, and training on several ranks.
    cmd mpirun >/dev/null || want openmpi-bin
    # build-probe-mpi's fallback when mpicc gives nothing.
    runs pkg-config --version || want pkg-config
    # rustc links through `cc`; mpicc -show compiles with gcc (package gcc: both).
    runs cc --version || want gcc
    # ...against the C library's start files and libc.so.
    local f crt=""; for f in "$R"/usr/lib/*/crt1.o "$R"/usr/lib*/crt1.o; do crt=1; done
    [ -n "$crt" ] || want libc6-dev
    # tests/tests/distributed.rs kills a rank with pgrep and /bin/kill.
    runs pgrep --version || want procps
    # Without ../shared, quickstart fetches MovieLens and the encoder with pip.
    if [ ! -d "$here/../shared/datasets" ]; then runs python3 -m pip --version || want python3-pip; fi
}

have_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    echo "setup: cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
    return 1
}

check
if [ "${1:-}" = "--check" ]; then
    if ((${#missing[@]})); then printf '%s\n' "${missing[@]}"; else echo "nothing missing"; fi
    have_cargo && ((${#missing[@]} == 0))
    exit
fi

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    check
    if ((${#missing[@]})); then
        echo "setup: still missing after apt-get install: ${missing[*]}" >&2
        exit 1
    fi
fi
have_cargo
