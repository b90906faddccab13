//! Authenticated datagrams and records: `comms_plugin_api::security::signed` (shared with the
//! other discovery), and the security types it works with.

pub use comms_plugin_api::security::signed::*;
