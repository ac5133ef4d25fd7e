//! The I/O APIC at its standard address (one of them with microvm's `acpi=off`): routes a
//! device's GSI to a vector on the boot CPU, and masks everything else.

const BASE: usize = 0xfec0_0000;

fn write(reg: u32, value: u32) {
    // SAFETY: BASE is the IOAPIC's register window (IOREGSEL at +0, IOWIN at +0x10),
    // identity-mapped uncached by the boot page tables.
    unsafe {
        (BASE as *mut u32).write_volatile(reg);
        ((BASE + 0x10) as *mut u32).write_volatile(value);
    }
}

fn read(reg: u32) -> u32 {
    // SAFETY: as for `write`.
    unsafe {
        (BASE as *mut u32).write_volatile(reg);
        ((BASE + 0x10) as *const u32).read_volatile()
    }
}

/// Number of redirection entries.
pub fn pins() -> u32 {
    ((read(1) >> 16) & 0xff) + 1
}

/// Masks every redirection entry.
pub fn mask_all() {
    for pin in 0..pins() {
        write(0x10 + 2 * pin, 1 << 16);
        write(0x11 + 2 * pin, 0);
    }
}

/// Trigger and polarity of a line.
#[derive(Clone, Copy, Debug)]
pub struct LineMode {
    pub level_triggered: bool,
    pub active_low: bool,
}

/// Routes `gsi` to `vector`, fixed delivery, physical destination APIC 0, unmasked.
pub fn route(gsi: u32, vector: u8, mode: LineMode) -> bool {
    if gsi >= pins() {
        return false;
    }
    let mut low = u32::from(vector);
    if mode.active_low {
        low |= 1 << 13;
    }
    if mode.level_triggered {
        low |= 1 << 15;
    }
    write(0x11 + 2 * gsi, 0);
    write(0x10 + 2 * gsi, low);
    true
}
