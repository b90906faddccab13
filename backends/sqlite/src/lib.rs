//! # comms-sqlite: the SQLite transport and discovery plugin (work in progress)
