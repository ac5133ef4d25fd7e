//! virtio-net through `virtio-drivers`: finding the device (virtio-mmio on `microvm`,
//! virtio-net-pci on `q35`), the identity-mapped `Hal`, and the driver glue that keeps
//! receive and transmit buffers in flight without waiting on the device.

use alloc::alloc::{alloc_zeroed, dealloc};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

use crate::arch::idt::{self, NicAck, VECTOR_NIC};
use crate::arch::ioapic::{self, LineMode};
use crate::arch::port::{inl, outl};

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 64;
/// Bytes per receive/transmit buffer: a full Ethernet frame plus the virtio-net header.
const BUF_LEN: usize = 1536 + 16;
/// Receive buffers kept posted to the device.
const RX_POSTED: usize = 48;

/// Identity-mapped DMA from the kernel heap.
pub struct KernelHal;

// SAFETY: memory is identity-mapped, so a heap address is the physical address the device
// uses; allocations are page-aligned, zeroed and owned by the driver until `dma_dealloc`.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Ok(layout) = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size (pages >= 1 for every virtqueue).
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Ok(layout) = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE) else {
            return -1;
        };
        // SAFETY: the caller passes back exactly what `dma_alloc` returned, with the same size.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO address is never 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// PCI configuration space through ports 0xCF8/0xCFC (bus 0 is all q35 gives us here).
pub struct PortCam;

impl PortCam {
    fn address(df: DeviceFunction, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device) << 11)
            | (u32::from(df.function) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        outl(0xcf8, Self::address(df, offset));
        inl(0xcfc)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        outl(0xcf8, Self::address(df, offset));
        outl(0xcfc, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// Why no NIC could be brought up (printed with `Debug` in the boot log).
#[derive(Debug)]
#[allow(dead_code)]
pub enum NicError {
    NotFound,
    Driver(virtio_drivers::Error),
    NoInterruptRoute(u32),
}

/// Where the NIC was found.
pub struct Found {
    pub transport: SomeTransport<'static>,
    pub kind: &'static str,
    pub gsi: u32,
    pub line: LineMode,
    pub ack: NicAck,
}

const MMIO_SLOT_SIZE: usize = 0x200;
const MICROVM_MMIO_BASE: usize = 0xfeb0_0000;
const MICROVM_IRQ_BASE: u32 = 5;

/// Parses `virtio_mmio.device=512@0xfeb00e00:12` entries QEMU appends with `acpi=off`.
fn mmio_from_cmdline(cmdline: &str) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
    cmdline.split_ascii_whitespace().filter_map(|arg| {
        let spec = arg.strip_prefix("virtio_mmio.device=")?;
        let (size, rest) = spec.split_once('@')?;
        let (addr, irq) = rest.split_once(':')?;
        let size = parse_num(size)?;
        let addr = parse_num(addr)?;
        let irq = parse_num(irq)? as u32;
        Some((addr, size, irq))
    })
}

fn parse_num(s: &str) -> Option<usize> {
    let (digits, radix) = match s.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    let (digits, mult) = match digits.strip_suffix(['K', 'k']) {
        Some(d) if radix == 10 => (d, 1024),
        _ => (digits, 1),
    };
    usize::from_str_radix(digits, radix).ok().map(|v| v * mult)
}

fn try_mmio(addr: usize, size: usize, gsi: u32) -> Option<Found> {
    let header = NonNull::new(addr as *mut VirtIOHeader)?;
    // SAFETY: `addr` is a virtio-mmio slot QEMU announced (or one of microvm's fixed slots),
    // identity-mapped uncached in the MMIO hole; `MmioTransport::new` checks the magic first
    // and nothing else maps this slot.
    let transport = unsafe { MmioTransport::new(header, size) }.ok()?;
    if transport.device_type() != DeviceType::Network {
        return None;
    }
    Some(Found {
        transport: SomeTransport::Mmio(transport),
        kind: "virtio-mmio",
        gsi,
        line: LineMode {
            level_triggered: true,
            active_low: false,
        },
        ack: NicAck::Mmio { base: addr },
    })
}

fn find_mmio(cmdline: &str) -> Option<Found> {
    for (addr, size, irq) in mmio_from_cmdline(cmdline) {
        if let Some(f) = try_mmio(addr, size, irq) {
            return Some(f);
        }
    }
    // No announcement (acpi=on): scan microvm's slots; slot i raises GSI 5 + i.
    for slot in 0..24 {
        let addr = MICROVM_MMIO_BASE + slot * MMIO_SLOT_SIZE;
        // SAFETY: reading the magic of a microvm virtio-mmio slot (unpopulated slots read 0).
        let magic = unsafe { (addr as *const u32).read_volatile() };
        if magic == 0x7472_6976
            && let Some(f) = try_mmio(addr, MMIO_SLOT_SIZE, MICROVM_IRQ_BASE + slot as u32)
        {
            return Some(f);
        }
    }
    None
}

/// Base of the window where the kernel places PCI BARs (qboot assigns none).
const PCI_MMIO_WINDOW: u64 = 0xc000_0000;
const PCI_MMIO_WINDOW_END: u64 = 0xfe00_0000;

fn find_pci() -> Option<Found> {
    let mut root = PciRoot::new(PortCam);
    let mut next_bar = PCI_MMIO_WINDOW;
    for device in 0..32u8 {
        let df = DeviceFunction {
            bus: 0,
            device,
            function: 0,
        };
        let id = PortCam.read_word(df, 0);
        let (vendor, dev_id) = (id as u16, (id >> 16) as u16);
        if vendor != 0x1af4 || !(dev_id == 0x1000 || dev_id == 0x1041) {
            continue;
        }
        // Assign every memory BAR, naturally aligned, then enable memory decoding and DMA.
        let mut bar = 0u8;
        while bar < 6 {
            let info = root.bar_info(df, bar).ok()?;
            let takes_two = info.as_ref().is_some_and(|i| i.takes_two_entries());
            if let Some(BarInfo::Memory {
                address_type, size, ..
            }) = info
                && size > 0
            {
                let addr = next_bar.div_ceil(size) * size;
                if addr + size > PCI_MMIO_WINDOW_END {
                    return None;
                }
                match address_type {
                    MemoryBarType::Width64 => root.set_bar_64(df, bar, addr),
                    _ => root.set_bar_32(df, bar, addr as u32),
                }
                next_bar = addr + size;
            }
            bar += if takes_two { 2 } else { 1 };
        }
        root.set_command(
            df,
            Command::MEMORY_SPACE | Command::BUS_MASTER | Command::IO_SPACE,
        );
        let isr = isr_address(df)?;
        let pin = (PortCam.read_word(df, 0x3c) >> 8) & 0xff;
        // q35 routes slot S, pin P (1 = INTA) to PIRQ E..H as (S + P - 1) % 4 + 4, and PIRQ n
        // to GSI 16 + n when the IOAPIC is in use (QEMU's ich9 LPC defaults).
        let gsi = 16 + 4 + (u32::from(device) + pin.max(1) - 1) % 4;
        let transport = PciTransport::new::<KernelHal, _>(&mut root, df).ok()?;
        return Some(Found {
            transport: SomeTransport::Pci(transport),
            kind: "virtio-pci",
            gsi,
            line: LineMode {
                level_triggered: true,
                active_low: true,
            },
            ack: NicAck::PciIsr { addr: isr },
        });
    }
    None
}

/// Address of the virtio-pci ISR status byte (vendor capability with cfg_type 3).
fn isr_address(df: DeviceFunction) -> Option<usize> {
    let cam = PortCam;
    let mut ptr = (cam.read_word(df, 0x34) & 0xfc) as u8;
    let mut hops = 0;
    while ptr != 0 && hops < 48 {
        let head = cam.read_word(df, ptr);
        let (cap_id, next) = (head as u8, (head >> 8) as u8);
        let cfg_type = (head >> 24) as u8;
        if cap_id == 0x09 && cfg_type == 3 {
            let bar = cam.read_word(df, ptr + 4) as u8;
            let offset = cam.read_word(df, ptr + 8) as usize;
            let raw = cam.read_word(df, 0x10 + 4 * bar);
            let mut base = u64::from(raw & !0xf);
            if raw & 0b110 == 0b100 {
                base |= u64::from(cam.read_word(df, 0x14 + 4 * bar)) << 32;
            }
            return Some(base as usize + offset);
        }
        ptr = next & 0xfc;
        hops += 1;
    }
    None
}

/// A NIC with its receive buffers posted and its transmit buffers in flight.
pub struct Nic {
    raw: VirtIONetRaw<KernelHal, SomeTransport<'static>, QUEUE_SIZE>,
    rx_posted: Vec<Option<Box<[u8]>>>,
    tx_inflight: Vec<Option<(Box<[u8]>, usize)>>,
    tx_free: Vec<Box<[u8]>>,
    pub kind: &'static str,
    pub mac: [u8; 6],
    pub stats: NicStats,
}

/// Frame counters of the NIC.
#[derive(Default, Clone, Copy)]
pub struct NicStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_queue_full: u64,
}

impl Nic {
    /// Finds the NIC (microvm's virtio-mmio first, then PCI), starts the driver, posts receive
    /// buffers, and routes its interrupt.
    pub fn bring_up(cmdline: &str) -> Result<Nic, NicError> {
        let found = find_mmio(cmdline)
            .or_else(find_pci)
            .ok_or(NicError::NotFound)?;
        let raw = VirtIONetRaw::new(found.transport).map_err(NicError::Driver)?;
        let mac = raw.mac_address();
        let mut nic = Nic {
            raw,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: Vec::new(),
            kind: found.kind,
            mac,
            stats: NicStats::default(),
        };
        for _ in 0..RX_POSTED {
            nic.post_rx(vec![0u8; BUF_LEN].into_boxed_slice())?;
        }
        idt::set_nic_ack(found.ack);
        nic.raw.enable_interrupts();
        if !ioapic::route(found.gsi, VECTOR_NIC, found.line) {
            return Err(NicError::NoInterruptRoute(found.gsi));
        }
        log::debug!(
            "nic: {} mac {:02x?} gsi {} ({} rx buffers)",
            found.kind,
            mac,
            found.gsi,
            RX_POSTED
        );
        Ok(nic)
    }

    fn post_rx(&mut self, mut buf: Box<[u8]>) -> Result<(), NicError> {
        // SAFETY: the buffer is kept in `rx_posted` and not touched until the device returns
        // its token from `poll_receive`; boxed memory does not move.
        let token = unsafe { self.raw.receive_begin(&mut buf) }.map_err(NicError::Driver)?;
        self.rx_posted[usize::from(token)] = Some(buf);
        Ok(())
    }

    /// Whether a received frame is waiting.
    pub fn rx_pending(&self) -> bool {
        self.raw.poll_receive().is_some()
    }

    /// Takes the next received frame: `(buffer, start, len)`. Give the buffer back with
    /// `recycle_rx`.
    pub fn take_rx(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        let token = self.raw.poll_receive()?;
        let mut buf = self.rx_posted.get_mut(usize::from(token))?.take()?;
        // SAFETY: `buf` is the buffer posted with this token.
        match unsafe { self.raw.receive_complete(token, &mut buf) } {
            Ok((hdr, len)) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
                Some((buf, hdr, len))
            }
            Err(_) => {
                self.stats.rx_errors += 1;
                let _ = self.post_rx(buf);
                None
            }
        }
    }

    /// Posts a receive buffer back to the device.
    pub fn recycle_rx(&mut self, buf: Box<[u8]>) {
        if self.post_rx(buf).is_err() {
            self.stats.rx_errors += 1;
        }
    }

    /// Reclaims buffers of finished transmissions.
    pub fn reap_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buf, len)) = self
                .tx_inflight
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                break;
            };
            // SAFETY: `buf[..len]` is the slice submitted with this token.
            let _ = unsafe { self.raw.transmit_complete(token, &buf[..len]) };
            self.tx_free.push(buf);
        }
    }

    /// Whether a frame can be queued now.
    pub fn can_send(&mut self) -> bool {
        self.reap_tx();
        self.raw.can_send()
    }

    /// Queues a frame of `len` bytes written by `fill`, without waiting for the device.
    /// `fill` returns false to abandon the frame. Returns whether the frame was queued; when no
    /// transmit buffer is free, `fill` is not called (counted in `tx_queue_full`).
    pub fn send_frame(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        self.reap_tx();
        if !self.raw.can_send() {
            self.stats.tx_queue_full += 1;
            return false;
        }
        let mut buf = self
            .tx_free
            .pop()
            .unwrap_or_else(|| vec![0u8; BUF_LEN].into_boxed_slice());
        let Ok(hdr) = self.raw.fill_buffer_header(&mut buf) else {
            self.tx_free.push(buf);
            return false;
        };
        if hdr + len > buf.len() || !fill(&mut buf[hdr..hdr + len]) {
            self.tx_free.push(buf);
            return false;
        }
        let frame_len = hdr + len;
        // SAFETY: the buffer is parked in `tx_inflight` until `reap_tx` sees its token come
        // back; nothing touches it meanwhile and boxed memory does not move.
        match unsafe { self.raw.transmit_begin(&buf[..frame_len]) } {
            Ok(token) => {
                self.tx_inflight[usize::from(token)] = Some((buf, frame_len));
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
                true
            }
            Err(_) => {
                self.stats.tx_queue_full += 1;
                self.tx_free.push(buf);
                false
            }
        }
    }
}
