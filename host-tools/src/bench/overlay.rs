//! `unipeer bench overlay`: simulated overlay hops, consistency and upkeep (overlay issue).
