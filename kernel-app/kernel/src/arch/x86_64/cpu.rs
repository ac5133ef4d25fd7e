//! CPU control: interrupts on/off, halting, the TSC, CPUID and SIMD state.

use core::arch::asm;
use core::arch::x86_64::{__cpuid, _rdtsc};

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and has no side effects.
    unsafe { _rdtsc() }
}

/// Disables maskable interrupts.
pub fn cli() {
    // SAFETY: only changes IF; the kernel runs with interrupts off except while idle.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Idles until an interrupt arrives, with none lost: `sti` holds interrupts off for one more
/// instruction, so an interrupt pending before `hlt` wakes it. Returns with interrupts off again.
pub fn wait_for_interrupt() {
    // SAFETY: the interrupt handlers are installed before the first call; they run on this
    // stack and return here.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Stops the CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, `hlt` only resumes on NMI, after which we halt again.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// `(eax, ebx, ecx, edx)` of CPUID leaf `leaf`, sub-leaf 0.
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = __cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Turns on the SIMD state crates pick at run time: SSE is on from boot (CR4.OSFXSR); when the
/// CPU has XSAVE, also AVX state in XCR0 so CPUID-based detection (e.g. in `sha2`) is truthful.
/// Returns a description for the boot log.
pub fn enable_simd() -> &'static str {
    let (_, _, ecx, _) = cpuid(1);
    let has_xsave = ecx & (1 << 26) != 0;
    let has_avx = ecx & (1 << 28) != 0;
    if !has_xsave {
        return "sse";
    }
    // SAFETY: CR4.OSXSAVE exists when CPUID.1:ECX.XSAVE is set; setting it only enables
    // XGETBV/XSETBV.
    unsafe {
        asm!(
            "mov {t}, cr4",
            "or {t}, {bit}",
            "mov cr4, {t}",
            t = out(reg) _,
            bit = const 1u64 << 18,
            options(nomem, nostack)
        )
    }
    let xcr0: u64 = if has_avx { 0b111 } else { 0b011 };
    // SAFETY: XCR0 takes x87|SSE (always valid with XSAVE) and AVX only when CPUID says so.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32,
             options(nomem, nostack))
    }
    if has_avx { "sse+avx" } else { "sse+xsave" }
}

/// The instruction `hardware_entropy` draws from on this CPU, if any.
pub fn entropy_instruction() -> Option<&'static str> {
    let has_rdrand = cpuid(1).2 & (1 << 30) != 0;
    let has_rdseed = cpuid(0).0 >= 7 && __cpuid_count_ebx7() & (1 << 18) != 0;
    if has_rdseed {
        Some("rdseed")
    } else if has_rdrand {
        Some("rdrand")
    } else {
        None
    }
}

/// Up to 32 bytes from RDSEED or RDRAND, when the CPU has them (empty otherwise); mixed into
/// the per-launch seed, never used alone.
pub fn hardware_entropy() -> heapless::Vec<u8, 32> {
    let mut out = heapless::Vec::new();
    let has_rdrand = cpuid(1).2 & (1 << 30) != 0;
    let has_rdseed = cpuid(0).0 >= 7 && __cpuid_count_ebx7() & (1 << 18) != 0;
    if !has_rdrand && !has_rdseed {
        return out;
    }
    for _ in 0..4 {
        let mut value: u64 = 0;
        let mut ok: u8 = 0;
        for _ in 0..10 {
            if has_rdseed {
                // SAFETY: RDSEED exists (CPUID.7.0:EBX bit 18); it only writes the register and CF.
                unsafe {
                    asm!("rdseed {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok,
                         options(nomem, nostack))
                }
            } else {
                // SAFETY: RDRAND exists (CPUID.1:ECX bit 30); it only writes the register and CF.
                unsafe {
                    asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok,
                         options(nomem, nostack))
                }
            }
            if ok == 1 {
                break;
            }
        }
        if ok == 1 {
            let _ = out.extend_from_slice(&value.to_le_bytes());
        }
    }
    out
}

fn __cpuid_count_ebx7() -> u32 {
    core::arch::x86_64::__cpuid_count(7, 0).ebx
}
