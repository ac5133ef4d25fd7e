//! Interrupt descriptor table, trap entry stubs and the dispatcher.
//!
//! The kernel runs with interrupts off except inside `cpu::wait_for_interrupt`, so a handler
//! never preempts kernel code: handlers only count, acknowledge and return. CPU exceptions
//! print the fault on the serial console and leave QEMU with `GuestExit::CpuException`.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use unipeer_node::launch::GuestExit;

use super::apic;

/// Vector of the local-APIC one-shot timer.
pub const VECTOR_TIMER: u8 = 0x20;
/// Vector of the NIC's interrupt (routed through the IOAPIC).
pub const VECTOR_NIC: u8 = 0x21;
/// Vector for the local APIC's spurious interrupts.
pub const VECTOR_SPURIOUS: u8 = 0xff;

/// Interrupt counters, per source.
pub struct IrqCounters {
    pub timer: AtomicU64,
    pub nic: AtomicU64,
    pub spurious: AtomicU64,
    pub other: AtomicU64,
}

pub static IRQS: IrqCounters = IrqCounters {
    timer: AtomicU64::new(0),
    nic: AtomicU64::new(0),
    spurious: AtomicU64::new(0),
    other: AtomicU64::new(0),
};

/// How the NIC interrupt is acknowledged at the device, before the EOI (the line is
/// level-triggered: without the device-side acknowledgement it would fire again at once).
#[derive(Clone, Copy)]
pub enum NicAck {
    /// virtio-mmio: read InterruptStatus at `base + 0x60`, write it to InterruptACK at `+ 0x64`.
    Mmio { base: usize },
    /// virtio-pci: reading the ISR status byte acknowledges it.
    PciIsr { addr: usize },
}

static NIC_ACK_KIND: AtomicUsize = AtomicUsize::new(0);
static NIC_ACK_ADDR: AtomicUsize = AtomicUsize::new(0);

/// Registers how the NIC interrupt is acknowledged. The address must stay mapped.
pub fn set_nic_ack(ack: NicAck) {
    let (kind, addr) = match ack {
        NicAck::Mmio { base } => (1, base),
        NicAck::PciIsr { addr } => (2, addr),
    };
    NIC_ACK_ADDR.store(addr, Ordering::Relaxed);
    NIC_ACK_KIND.store(kind, Ordering::Release);
}

fn ack_nic() {
    let addr = NIC_ACK_ADDR.load(Ordering::Relaxed);
    match NIC_ACK_KIND.load(Ordering::Acquire) {
        1 => {
            let status = (addr + 0x60) as *const u32;
            let ack = (addr + 0x64) as *mut u32;
            // SAFETY: `addr` is the virtio-mmio register block registered by the NIC driver,
            // identity-mapped uncached; these are its InterruptStatus/InterruptACK registers.
            unsafe { ack.write_volatile(status.read_volatile()) }
        }
        2 => {
            // SAFETY: `addr` is the virtio-pci ISR status byte inside a BAR the kernel mapped;
            // reading it is the acknowledgement.
            unsafe { (addr as *const u8).read_volatile() };
        }
        _ => {}
    }
}

/// Register state pushed by the entry stubs, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// Stubs for vectors 0..=63 and 255. CPU exceptions 8, 10-14, 17, 21, 29 and 30 push an
// error code; the others get a 0 so every frame has the same shape.
global_asm!(
    r#"
    .macro TRAP_NOERR n
    .balign 16
trap_stub_\n:
    push 0
    push \n
    jmp trap_common
    .endm
    .macro TRAP_ERR n
    .balign 16
trap_stub_\n:
    push \n
    jmp trap_common
    .endm

    .section .text.traps, "ax"
    .code64
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    TRAP_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    TRAP_ERR \n
    .endr
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,255
    TRAP_NOERR \n
    .endr

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call trap_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata.trap_table, "a"
    .balign 8
    .global trap_stub_table
trap_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    .quad trap_stub_\n
    .endr
    .global trap_stub_255
    .quad trap_stub_255
    "#
);

unsafe extern "C" {
    static trap_stub_table: [u64; 65];
}

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([EMPTY_GATE; 256]);

fn gate(handler: u64) -> Gate {
    Gate {
        offset_low: handler as u16,
        selector: 0x08,
        ist: 0,
        type_attr: 0x8e, // present, ring 0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        reserved: 0,
    }
}

/// Fills and loads the IDT. Called once, early, with interrupts off.
pub fn init() {
    // SAFETY: `trap_stub_table` is the read-only table emitted above.
    let table = unsafe { &*core::ptr::addr_of!(trap_stub_table) };
    // SAFETY: single-threaded boot code with interrupts off; nothing else references the IDT
    // until `lidt` below, and it is never written again.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (vector, &handler) in table.iter().take(64).enumerate() {
        idt.0[vector] = gate(handler);
    }
    idt.0[255] = gate(table[64]);
    let ptr = IdtPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as *const Idt as u64,
    };
    // SAFETY: the IDT is a static with valid gates for every vector that can fire.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point exception",
    "alignment check",
    "machine check",
    "SIMD floating-point exception",
    "virtualization exception",
    "control protection exception",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection exception",
    "VMM communication exception",
    "security exception",
    "reserved",
];

#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        0..=31 => exception(frame),
        v if v == VECTOR_TIMER as u64 => {
            IRQS.timer.fetch_add(1, Ordering::Relaxed);
            apic::eoi();
        }
        v if v == VECTOR_NIC as u64 => {
            IRQS.nic.fetch_add(1, Ordering::Relaxed);
            ack_nic();
            apic::eoi();
        }
        v if v == VECTOR_SPURIOUS as u64 => {
            // Spurious interrupts take no EOI.
            IRQS.spurious.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            IRQS.other.fetch_add(1, Ordering::Relaxed);
            apic::eoi();
        }
    }
}

fn exception(frame: &TrapFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) }
    let name = EXCEPTION_NAMES[frame.vector as usize];
    crate::console::emergency(format_args!(
        "\nFATAL: CPU exception {} ({name}) error={:#x} rip={:#x} rsp={:#x} cr2={:#x} rflags={:#x}\n\
         rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n",
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.rsp,
        cr2,
        frame.rflags,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
    ));
    super::exit(GuestExit::CpuException)
}
