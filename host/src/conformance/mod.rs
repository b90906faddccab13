//! The conformance suite every transport must pass (work in progress).
