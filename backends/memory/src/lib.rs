//! # comms-memory: the in-memory transport plugin (work in progress)
