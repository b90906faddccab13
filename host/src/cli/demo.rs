//! `comms demo`: the embedded default. Two nodes in this process exchange typed messages over the
//! TCP plugin, loaded at run time from its shared library, on loopback. No server, no config.

use super::{other, CliError};
use comms_host::{plugin_search, Node, PluginLibrary};
use serde::{Deserialize, Serialize};
use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    number: u32,
    text: String,
}

/// Two loopback ports that are free right now.
fn free_ports() -> Result<(u16, u16), CliError> {
    let a = std::net::TcpListener::bind("127.0.0.1:0").map_err(other)?;
    let b = std::net::TcpListener::bind("127.0.0.1:0").map_err(other)?;
    Ok((a.local_addr().map_err(other)?.port(), b.local_addr().map_err(other)?.port()))
}

pub(super) async fn run(plugin_dir: Option<PathBuf>, messages: u32) -> Result<ExitCode, CliError> {
    let dirs = plugin_search::search_dirs(plugin_dir.as_slice());
    let Some(path) = plugin_search::find_plugin("tcp", &dirs) else {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(other(format!(
            "the tcp plugin ({}) was not found in {}; build the plugins first: cargo build --workspace",
            plugin_search::plugin_file_name("tcp"),
            searched.join(", ")
        )));
    };
    let library = PluginLibrary::load(&path).map_err(CliError::Load)?;
    println!(
        "loaded plugin `{}` {} from {}",
        library.description().name,
        library.description().version,
        path.display()
    );

    let (alice_port, bob_port) = free_ports()?;
    let alice_address = format!("127.0.0.1:{alice_port}");
    let bob_address = format!("127.0.0.1:{bob_port}");
    let alice = Node::builder("alice")
        .transport_library("tcp", library.clone(), &format!("listen = \"{alice_address}\""))
        .static_peer("bob", [("tcp", bob_address.as_str())])
        .build()
        .await?;
    let bob = Node::builder("bob")
        .transport_library("tcp", library, &format!("listen = \"{bob_address}\""))
        .static_peer("alice", [("tcp", alice_address.as_str())])
        .build()
        .await?;
    println!("alice listens on {alice_address}, bob on {bob_address}");

    for number in 1..=messages {
        let greeting = Greeting { number, text: format!("hello #{number} from alice") };
        alice.send("bob", &greeting).await.map_err(other)?;
        let received = bob.receive::<Greeting>().await.map_err(other)?;
        println!("bob   <- {}: {:?}", received.from, received.message.text);
        let reply = Greeting { number, text: format!("reply #{number} from bob") };
        bob.send(received.from.clone(), &reply).await.map_err(other)?;
        let answer = alice.receive::<Greeting>().await.map_err(other)?;
        println!("alice <- {}: {:?}", answer.from, answer.message.text);
        if answer.message.number != number {
            return Err(other(format!("expected reply {number}, got {}", answer.message.number)));
        }
    }
    alice.close().await.map_err(other)?;
    bob.close().await.map_err(other)?;
    println!("demo finished: {messages} messages each way over the dynamically loaded tcp plugin");
    Ok(ExitCode::SUCCESS)
}
