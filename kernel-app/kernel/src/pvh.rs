//! Reading QEMU's PVH `hvm_start_info`: command line, modules (the launch config arrives as the
//! first module, from `-initrd`) and the memory map.

const START_MAGIC: u32 = 0x336e_c578;
const MEMMAP_TYPE_RAM: u32 = 1;
const MAX_RANGES: usize = 16;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct ModListEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

#[repr(C)]
struct MemMapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// What the boot loader told us.
pub struct BootInfo {
    pub cmdline: &'static str,
    /// The launch-config blob, exactly as long as the module.
    pub config: Option<&'static [u8]>,
    /// Usable RAM ranges `(start, end)`.
    pub ram: heapless::Vec<(u64, u64), MAX_RANGES>,
}

/// Why the start info could not be read (printed with `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
pub enum BootInfoError {
    BadMagic(u32),
}

unsafe extern "C" {
    static __kernel_end: u8;
}

/// First byte after the kernel image, `.bss` included.
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}

fn c_str(addr: u64, max: usize) -> &'static str {
    if addr == 0 {
        return "";
    }
    // SAFETY: QEMU places a NUL-terminated string at `addr` in identity-mapped low memory that
    // the heap never covers (it lies below the kernel or inside a carved-out range); the scan
    // is bounded by `max`.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, max) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(max);
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// Parses the start info at `addr` (the `ebx` of the PVH entry).
pub fn parse(addr: u32) -> Result<BootInfo, BootInfoError> {
    // SAFETY: the PVH boot protocol guarantees `ebx` points at an `hvm_start_info`; we check
    // the magic before trusting the rest.
    let info = unsafe { &*(addr as usize as *const StartInfo) };
    if info.magic != START_MAGIC {
        return Err(BootInfoError::BadMagic(info.magic));
    }
    let cmdline = c_str(info.cmdline_paddr, 4096);
    let config = if info.nr_modules > 0 && info.modlist_paddr != 0 {
        // SAFETY: `nr_modules > 0`, so the list holds at least one entry.
        let m = unsafe { &*(info.modlist_paddr as usize as *const ModListEntry) };
        let len = (m.size as usize).min(unipeer_node::launch::CONFIG_MAX_LEN + 1);
        // SAFETY: QEMU loaded the module at `paddr` with `size` bytes; the heap is carved
        // around it (see `heap_range`), so it stays intact and unaliased.
        Some(unsafe { core::slice::from_raw_parts(m.paddr as usize as *const u8, len) })
    } else {
        None
    };
    let mut ram = heapless::Vec::new();
    for i in 0..info.memmap_entries.min(64) as usize {
        // SAFETY: QEMU provides `memmap_entries` entries at `memmap_paddr`.
        let e = unsafe { &*((info.memmap_paddr as usize as *const MemMapEntry).add(i)) };
        if e.kind == MEMMAP_TYPE_RAM && e.size > 0 {
            let _ = ram.push((e.addr, e.addr + e.size));
        }
    }
    Ok(BootInfo {
        cmdline,
        config,
        ram,
    })
}

impl BootInfo {
    /// The largest RAM range above the kernel that overlaps neither the config module nor the
    /// page-table/MMIO hole above 3 GiB.
    pub fn heap_range(&self) -> Option<(u64, u64)> {
        let floor = (kernel_end() + 0xfff) & !0xfff;
        let hole = self.config.map(|c| {
            (
                c.as_ptr() as u64 & !0xfff,
                (c.as_ptr() as u64 + c.len() as u64 + 0xfff) & !0xfff,
            )
        });
        let mut best: Option<(u64, u64)> = None;
        let mut consider = |s: u64, e: u64| {
            let s = s.max(floor);
            let e = e.min(0xc000_0000);
            if e > s && best.is_none_or(|(bs, be)| e - s > be - bs) {
                best = Some((s, e));
            }
        };
        for &(s, e) in &self.ram {
            match hole {
                Some((hs, he)) if hs < e && he > s => {
                    consider(s, hs);
                    consider(he, e);
                }
                _ => consider(s, e),
            }
        }
        best
    }
}
