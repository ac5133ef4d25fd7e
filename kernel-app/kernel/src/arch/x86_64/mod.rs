//! Everything that touches the x86_64 machine directly. All of the kernel's `unsafe`
//! lives under `arch/` and the virtio glue in `net/virtio.rs`.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod idt;
pub mod ioapic;
pub mod pit;
pub mod port;
pub mod serial;

use unipeer_node::launch::GuestExit;

/// Leaves QEMU through `isa-debug-exit`; QEMU exits with `(code << 1) | 1`.
pub fn exit(code: GuestExit) -> ! {
    port::outb(GuestExit::PORT, code as u8);
    // Without the debug-exit device (a launcher that forgot it), stop here for good.
    cpu::halt_forever()
}
