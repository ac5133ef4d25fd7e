#!/usr/bin/env bash
# Installs what unipeer needs on a Debian machine; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nc >/dev/null || need_apt+=(netcat-openbsd)
[ -x /usr/bin/setpriv ] || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup (https://rustup.rs), then run this again" >&2
    exit 1
fi
# rust-toolchain.toml pins the toolchain; make sure it and the bare-metal target are present.
if command -v rustup >/dev/null; then
    rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
    rustup target list --installed | grep -qx x86_64-unknown-none \
        || rustup target add x86_64-unknown-none
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -1); $(cargo --version))"
