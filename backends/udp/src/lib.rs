//! # comms-udp: the ad-hoc LAN transport and discovery plugin (work in progress)
