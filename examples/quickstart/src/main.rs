//! Quickstart: two nodes, each built from its config file, exchanging typed messages.
//!
//! ```sh
//! cargo build --workspace            # builds the tcp plugin (target/debug/libcomms_tcp.so)
//! cargo run -p comms-quickstart      # runs from the repository root
//! ```
//!
//! The TCP transport is not linked into this program: the host loads `libcomms_tcp.so` at run
//! time, found next to the executable (or in `plugin_dirs` / `$COMMS_PLUGIN_PATH`).

use comms_host::Node;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What alice orders.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
}

/// What bob answers.
#[derive(Debug, Serialize, Deserialize)]
struct Confirmation {
    item: String,
    accepted: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let alice = Node::from_config(here.join("alice.toml")).await?;
    let bob = Node::from_config(here.join("bob.toml")).await?;

    for (item, quantity) in [("tea", 2), ("scones", 12), ("jam", 0)] {
        alice.send("bob", &Order { item: item.into(), quantity }).await?;

        let order = bob.receive::<Order>().await?;
        println!("bob received from {}: {:?}", order.from, order.message);
        let answer = Confirmation { item: order.message.item, accepted: order.message.quantity > 0 };
        bob.send(order.from, &answer).await?;

        let confirmation = alice.receive::<Confirmation>().await?;
        println!("alice received from {}: {:?}", confirmation.from, confirmation.message);
    }

    alice.close().await?;
    bob.close().await?;
    Ok(())
}
