#!/usr/bin/env bash
# The single-VM launch as a plain script (the same flags as `unipeer vm run`): one microvm under
# TCG with QEMU user networking, diagnostics forwarded to 127.0.0.1. Needs a built image and a
# launch config (write one with: unipeer vm run --exit-after-ready, which leaves
# run/vm/node-0/node-0.config behind).
#   scripts/run-vm.sh [KERNEL] [CONFIG] [UDP_PORT] [TCP_PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
KERNEL=${1:-images/default/kernel.elf}
CONFIG=${2:-run/vm/node-0/node-0.config}
UDP=${3:-17001}
TCP=${4:-17002}
ACCEL=${ACCEL:-tcg}
mkdir -p run/vm/script
exec qemu-system-x86_64 \
    -M microvm,acpi=off,pic=off,pit=on,rtc=off,isa-serial=on \
    -accel "$ACCEL" -smp 1 -m 16M \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$CONFIG" \
    -serial stdio \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -qmp unix:run/vm/script/qmp.sock,server=on,wait=off \
    -netdev "user,id=net0,net=10.0.2.0/24,hostfwd=udp:127.0.0.1:$UDP-:7001,hostfwd=tcp:127.0.0.1:$TCP-:7002" \
    -device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56
