//! Deterministic simulation of many unipeer nodes in one process (see the overlay issue).
