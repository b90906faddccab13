//! `libcomms_faults.so`: the fault-injection layer of [`fault_injection`] (crate comms-faults)
//! as a plugin library, for hosts that do not link it in (the comms host does: `faults` needs no
//! file there) and for `layers = [{ path = ".../libcomms_faults.so", ... }]`.

comms_plugin_api::export_plugin!(fault_injection::FaultsPlugin);
