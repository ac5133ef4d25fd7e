//! The 16550 UART at COM1, the kernel's console.

use super::port::{inb, outb};

const COM1: u16 = 0x3f8;

/// Programs COM1 for 115200 8N1, FIFO on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

/// Depth of the UART's transmit FIFO.
const FIFO: usize = 16;

/// Writes bytes, waiting for an empty transmit FIFO before each 16-byte burst (bounded: a
/// missing UART must not hang the kernel). Each port access is an exit to the emulator, so
/// the status is read once per burst rather than once per byte.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO) {
        let mut spins = 0u32;
        while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        for &b in chunk {
            outb(COM1, b);
        }
    }
}
