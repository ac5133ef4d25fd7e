//! The serial console and the `log` backend: every line carries the time since entry.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::serial;
use crate::clock;

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial::write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Set while a log line is being written; a fault inside the logger must not wait on it.
static BUSY: AtomicBool = AtomicBool::new(false);

/// Prints straight to the UART, without the logger (for faults and panics).
pub fn emergency(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
}

/// Prints a line to the console with no level or timestamp (machine-read lines such as the
/// ready marker).
pub fn println(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
    serial::write_bytes(b"\n");
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // Driver crates chat at info; only their warnings matter unless debugging.
        let driver = metadata.target().starts_with("virtio_drivers")
            || metadata.target().starts_with("smoltcp");
        let limit = if driver && log::max_level() < log::LevelFilter::Debug {
            log::LevelFilter::Warn
        } else {
            log::max_level()
        };
        metadata.level() <= limit
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || BUSY.swap(true, Ordering::Acquire) {
            return;
        }
        let us = clock::now_us();
        let _ = writeln!(
            Serial,
            "[{:5}.{:06}] {:5} {}",
            us / 1_000_000,
            us % 1_000_000,
            record.level(),
            record.args()
        );
        BUSY.store(false, Ordering::Release);
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Starts the UART and installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    serial::init();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
