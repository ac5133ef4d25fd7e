//! QEMU tests live in `tests/`; see the README for how they run.
