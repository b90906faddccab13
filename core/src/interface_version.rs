// The version of the comms plugin contract. This file is read by `build.rs` (with `include!`)
// as well as compiled into the crate, so it holds nothing but these two constants.
//
// Change them only when the contract changes, following the rules in `COMPATIBILITY.md`:
// a compatible addition bumps the minor, anything else bumps the major.

/// The contract's major version: plugins and hosts load each other only when it is equal.
pub const INTERFACE_MAJOR: u16 = 1;

/// The contract's minor version: grows with every compatible addition.
pub const INTERFACE_MINOR: u16 = 2;
