//! Gives the contract's types the contract's version instead of this crate's.
//!
//! abi_stable records in every type layout the package that defined it as
//! `CARGO_PKG_NAME;CARGO_PKG_VERSION`, and refuses to load a plugin whose types carry an
//! incompatible version. That version must be the *contract's* (`src/interface_version.rs`),
//! not comms-core's crate version, so that a release of the crates that leaves the contract alone
//! keeps loading every plugin already shipped. `src/lib.rs` checks at compile time that the
//! override took effect.

include!("src/interface_version.rs");

fn main() {
    println!("cargo:rerun-if-changed=src/interface_version.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=CARGO_PKG_VERSION={INTERFACE_MAJOR}.{INTERFACE_MINOR}.0");
    println!("cargo:rustc-env=CARGO_PKG_VERSION_MAJOR={INTERFACE_MAJOR}");
    println!("cargo:rustc-env=CARGO_PKG_VERSION_MINOR={INTERFACE_MINOR}");
    println!("cargo:rustc-env=CARGO_PKG_VERSION_PATCH=0");
}
