//! PVH entry: QEMU's `-kernel` finds the `XEN_ELFNOTE_PHYS32_ENTRY` note and enters
//! `pvh_start32` in 32-bit protected mode, paging off, with `ebx` pointing at the
//! `hvm_start_info` structure. This code records the TSC, clears `.bss`, identity-maps the
//! first 4 GiB with 2 MiB pages (the top GiB, where MMIO lives, uncached), enables PAE, long
//! mode and SSE, and calls `kernel_main(start_info)` on the boot stack.

use core::arch::global_asm;

/// Size of the boot (and only) kernel stack.
pub const STACK_BYTES: usize = 128 * 1024;

#[repr(C, align(16))]
pub struct Stack([u8; STACK_BYTES]);

/// The kernel stack; the linker places it in `.bss`.
#[unsafe(no_mangle)]
pub static mut BOOT_STACK: Stack = Stack([0; STACK_BYTES]);

/// TSC read by the first instruction after entry (`.data`: survives the `.bss` clear).
#[unsafe(no_mangle)]
pub static mut BOOT_TSC: u64 = 1;

global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .rodata.boot_gdt, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
    .balign 16
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss.boot_tables, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    rdtsc
    mov dword ptr [BOOT_TSC], eax
    mov dword ptr [BOOT_TSC + 4], edx
    mov esi, ebx

    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax

    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot_pd
    or eax, 3
    mov dword ptr [boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb 1b

    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    cmp ecx, 1536
    jb 3f
    or eax, 0x18
3:
    mov dword ptr [boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b

    mov eax, cr4
    or eax, 0x620
    mov cr4, eax

    mov eax, offset boot_pml4
    mov cr3, eax

    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr

    mov eax, cr0
    and eax, 0xFFFFFFFB
    or eax, 0x80000003
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    push 0x08
    .byte 0x68
    .long pvh_start64
    retf

    .code64
pvh_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset BOOT_STACK + {stack_bytes}
    xor ebp, ebp
    mov edi, esi
    call kernel_main
4:
    hlt
    jmp 4b
    "#,
    stack_bytes = const STACK_BYTES,
);
