//! Local cluster networking: the user-space L2 switch with fault injection (cluster issue).
