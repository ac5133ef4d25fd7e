#!/usr/bin/env bash
# Installs what unipeer needs on a Debian machine; safe to run again (it installs only what is
# missing). As root it calls apt-get directly; otherwise through sudo, and only when something
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nc >/dev/null || need_apt+=(netcat-openbsd)
[ -x /usr/bin/setpriv ] || need_apt+=(util-linux)
# Cargo links host binaries (build scripts, the CLI, the tests) with the system C linker.
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
# The fuzz targets' libFuzzer (the libfuzzer-sys crate) is C++.
command -v c++ >/dev/null || need_apt+=(g++)
# The replication agent's service speaks RESP: its tests drive it with Redis's own client and
# compare it with a real server.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
# The dashboard's browser test (tests/qemu/tests/dashboard.rs): headless Chromium.
command -v chromium >/dev/null || need_apt+=(chromium)

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    as_root=()
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "setup: ${need_apt[*]} missing, and this is not root and there is no sudo;" \
                "run as root: apt-get install ${need_apt[*]}" >&2
            exit 1
        fi
        as_root=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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
echo "setup: ok ($(qemu-system-x86_64 --version | head -1); $(cargo --version); $(cc --version | head -1))"
