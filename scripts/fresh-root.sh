#!/usr/bin/env bash
# Rehearses the README's two commands (scripts/quickstart.sh, then
# scripts/test.sh) on a clean Debian 12 root, the way a new machine with only
# Rust installed runs them. Run as root on a Debian/Ubuntu host:
#
#   bash scripts/fresh-root.sh [options] DIR
#     --commit REV      repository state to clone (default: HEAD of this checkout)
#     --overlay FILE    copy FILE of this working tree over the clone (repeatable),
#                       to rehearse uncommitted changes
#     --reuse           keep DIR's existing base system and toolchain (each step
#                       leaves a stamp in DIR/.fresh-root and is skipped when present)
#     --keep-clone      keep DIR/work/main and its target/ (overlays are re-copied)
#     --only STEP       run only quickstart or test
#     --logs LOGDIR     default DIR-logs
#     --no-shared       do not mount ../shared: quickstart takes its PyPI path
#     --base-extra PKGS packages added to the base (default "libclang-cpp14": the
#                       stock images of issue 9 carry it; "" for none)
#
# The root: `debootstrap --variant=minbase bookworm` (essential packages and
# apt), plus ca-certificates (rustup and cargo fetch over TLS), plus the base
# extras, plus this machine's default Rust toolchain copied to /root/.rustup and
# /root/.cargo/bin (crates come from crates.io, not from ~/.cargo/registry),
# plus the CA certificates of this host that the root lacks (see below).
# No C compiler: rustup does not install one, so setup.sh must (gcc,
# libc6-dev). ../shared of this checkout is bind-mounted read-only at
# DIR/work/shared, so quickstart uses beauty5_tiny. Logs: LOGDIR/{quickstart,
# test}.log, the packages before and after, and setup.sh --check before.
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
commit=HEAD overlays=() reuse=0 keep_clone=0 shared=1 only="" logs="" extra="libclang-cpp14"
while (($#)); do
    case "$1" in
    --commit) commit="$2"; shift 2 ;;
    --overlay) overlays+=("$2"); shift 2 ;;
    --reuse) reuse=1; shift ;;
    --keep-clone) keep_clone=1; shift ;;
    --only) only="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --no-shared) shared=0; shift ;;
    --base-extra) extra="$2"; shift 2 ;;
    -*) echo "fresh-root: unknown option $1" >&2; exit 2 ;;
    *) break ;;
    esac
done
[ $# -eq 1 ] || { sed -n '2,18p' "$0" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "fresh-root: run as root (debootstrap, mount, chroot)" >&2; exit 1; }
dir="$(mkdir -p "$1" && cd "$1" && pwd)"
logs="${logs:-$dir-logs}"
mkdir -p "$logs" "$dir/.fresh-root"
stamp() { [ "$reuse" -eq 1 ] && [ -f "$dir/.fresh-root/$1" ]; }
log() { echo "fresh-root: $*" >&2; }

# Mounts, undone on any exit.
mounts=()
cleanup() { local i; for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -R "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" || true; done; }
trap cleanup EXIT
mnt() { # mount args... TARGET
    local target="${*: -1}"
    mountpoint -q "$target" && umount -R "$target"
    mkdir -p "$target"
    mount "$@"
    mounts+=("$target")
}
inroot() { # runs bash -c "$1" in the root, with a login-like environment
    chroot "$dir" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        bash -c "$1"
}

if ! stamp debootstrap; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    log "debootstrap --variant=minbase bookworm $dir"
    rm -rf "${dir:?}"/{bin,boot,etc,home,lib,lib64,media,mnt,opt,root,run,sbin,srv,tmp,usr,var}
    debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian >"$logs/debootstrap.log" 2>&1
    # The apt sources of a Debian 12 install (minbase writes only "bookworm main").
    cat >"$dir/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    touch "$dir/.fresh-root/debootstrap"
fi

cp /etc/resolv.conf "$dir/etc/resolv.conf"
mnt -t proc proc "$dir/proc"
mnt -t sysfs sys "$dir/sys"
mnt --rbind /dev "$dir/dev"
mount --make-rslave "$dir/dev"

if ! stamp base; then
    log "base: ca-certificates $extra"
    inroot "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates $extra >/dev/null" \
        >"$logs/base.log" 2>&1
    touch "$dir/.fresh-root/base"
fi
# The root reaches crates.io as this host does: CA certificates that this
# host's bundle has and the root's lacks (e.g. of a TLS-intercepting proxy)
# become local CAs of the root.
awk -v out="$dir/usr/local/share/ca-certificates/fresh-root-host" -v have="$dir/etc/ssl/certs/ca-certificates.crt" '
    BEGIN { while ((getline l < have) > 0) if (l !~ /^-----|^$/) seen = seen l; }
    /BEGIN CERT/ { n++; body = ""; pem = "" }
    { pem = pem $0 "\n"; if ($0 !~ /^-----|^$/) body = body $0 }
    /END CERT/ { if (index(seen, body) == 0) { f = out "-" n ".crt"; printf "%s", pem > f; close(f) } }
' /etc/ssl/certs/ca-certificates.crt
inroot 'update-ca-certificates >/dev/null 2>&1'

if ! stamp rust; then
    tc="$(cd "$src" && rustup show active-toolchain | cut -d' ' -f1)"
    tcdir="$(readlink -f "$HOME/.rustup/toolchains/$tc")"
    log "rust: toolchain $tc ($tcdir)"
    rm -rf "$dir/root/.rustup" "$dir/root/.cargo"
    mkdir -p "$dir/root/.rustup/toolchains" "$dir/root/.rustup/update-hashes" "$dir/root/.cargo"
    cp -a "$tcdir" "$dir/root/.rustup/toolchains/${tcdir##*/}"
    [ "${tcdir##*/}" = "$tc" ] || ln -s "${tcdir##*/}" "$dir/root/.rustup/toolchains/$tc"
    cp -a "$HOME/.rustup/update-hashes/${tcdir##*/}" "$dir/root/.rustup/update-hashes/" 2>/dev/null || true
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "default"\n' "${tcdir##*/}" >"$dir/root/.rustup/settings.toml"
    cp -a "$HOME/.cargo/bin" "$HOME/.cargo/env" "$dir/root/.cargo/"
    touch "$dir/.fresh-root/rust"
fi

if [ "$keep_clone" -eq 0 ] || [ ! -d "$dir/work/main/.git" ]; then
    rev="$(git -C "$src" rev-parse "$commit")"
    log "clone $src at $rev"
    rm -rf "$dir/work/main"
    git clone -q "$src" "$dir/work/main"
    git -C "$dir/work/main" checkout -q --detach "$rev"
fi
for f in "${overlays[@]}"; do
    log "overlay $f"
    mkdir -p "$(dirname "$dir/work/main/$f")"
    cp "$src/$f" "$dir/work/main/$f"
done
if [ "$shared" -eq 1 ] && [ -d "$src/../shared" ]; then
    mnt --bind "$(cd "$src/../shared" && pwd)" "$dir/work/shared"
    mount -o remount,bind,ro "$dir/work/shared"
fi

inroot 'dpkg-query -W -f "\${Package}\n" | sort' >"$logs/packages-before.txt"
inroot 'cd /work/main && bash scripts/setup.sh --check' >"$logs/check-before.log" 2>&1 || true
log "setup.sh --check before: $(tr '\n' ' ' <"$logs/check-before.log")"

status=0
echo "== $(date -u +%FT%TZ) $(git -C "$dir/work/main" rev-parse HEAD) overlays: ${overlays[*]:-none}" >>"$logs/summary.txt"
for step in quickstart test; do
    [ -z "$only" ] || [ "$only" = "$step" ] || continue
    log "$step: running (log $logs/$step.log)"
    start=$(date +%s)
    rc=0
    inroot "cd /work/main && bash scripts/$step.sh" >"$logs/$step.log" 2>&1 || rc=$?
    secs=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then verdict=PASS; else verdict=FAIL status=1; fi
    echo "$step: $verdict (exit $rc) in $((secs / 60))m$((secs % 60))s" | tee -a "$logs/summary.txt"
done
inroot 'dpkg-query -W -f "\${Package}\n" | sort' >"$logs/packages-after.txt"
echo "packages installed: $(comm -13 "$logs/packages-before.txt" "$logs/packages-after.txt" | wc -l)" \
    "(setup.sh asked for: $(grep -ho 'setup: installing .*' "$logs"/{quickstart,test}.log 2>/dev/null | sed 's/setup: installing //' | tr '\n' ' '))" |
    tee -a "$logs/summary.txt"
exit "$status"
