//! `comms keygen`: node identities and network keys.

use super::{other, CliError};
use comms_plugin_api::security::{Identity, NetworkKey};
use std::{path::Path, process::ExitCode};

fn print_identity(identity: &Identity, label: Option<&str>) {
    let key = identity.public_key();
    println!("public key: {key}");
    match label {
        Some(label) => println!("node id:    {}", identity.node_id(Some(label))),
        None => {
            println!("node id:    {}", identity.node_id(None));
            println!("            (or <label>-{key} with `id = \"<label>\"` next to `key_file` in [node])");
        }
    }
}

/// Writes a new key file (never overwriting one) and prints its public half, never the secret.
pub(super) fn generate(out: Option<&Path>, network: bool, label: Option<&str>) -> Result<ExitCode, CliError> {
    if network {
        let out = out.unwrap_or(Path::new("network.key"));
        NetworkKey::generate().save_new(out).map_err(other)?;
        println!(
            "wrote network key {} (owner-only; give it to every node of the network, nobody else)",
            out.display()
        );
        println!("use it with `network_key_file = \"{}\"` in [security]", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let out = out.unwrap_or(Path::new("comms.key"));
    let identity = Identity::generate();
    identity.save_new(out).map_err(other)?;
    println!("wrote {} (owner-only; keep it secret)", out.display());
    print_identity(&identity, label);
    Ok(ExitCode::SUCCESS)
}

/// Prints the public key and node id of an existing key file.
pub(super) fn show(file: &Path, label: Option<&str>) -> Result<ExitCode, CliError> {
    let identity = Identity::load(file).map_err(other)?;
    print_identity(&identity, label);
    Ok(ExitCode::SUCCESS)
}
