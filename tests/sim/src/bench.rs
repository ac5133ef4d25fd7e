//! Overlay benchmark runs (used by `unipeer bench overlay`).
