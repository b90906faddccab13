//! Fault injection around any transport (work in progress).
