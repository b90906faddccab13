//! Interoperability: a Python program (nats-py) sends to a comms node by publishing the
//! documented headers and payload on the node's inbox subject, and reads the answer the node
//! sent to the Python program's own inbox through a durable consumer of its own. The script is
//! the one `docs/nats.md` shows.

#[path = "support/nats.rs"]
mod support;

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, broker_available, python_available, scratch_dir, NATS};
use std::{process::Command, time::Duration};
use support::Deployment;

/// `python3 interop.py send STREAM PREFIX COMMS_NODE PY_NODE` sends one message to the comms
/// node; `... receive STREAM PREFIX COMMS_NODE PY_NODE CORRELATION` prints (as JSON) the message
/// the comms node sent back, the one answering CORRELATION.
const SCRIPT: &str = r#"
import asyncio, json, sys
import nats

async def main():
    stage, stream, prefix, comms_node, py_node = sys.argv[1:6]
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    if stage == "send":
        await js.publish(f"{prefix}.inbox.{comms_node}", json.dumps({"greeting": "hello from python"}).encode(),
            stream=stream, headers={
                "Comms-Version": "1",
                "Comms-Id": "%032x" % 0x1234abcd,
                "Comms-From": py_node,
                "Comms-To-Kind": "node",
                "Comms-To": comms_node,
                "Comms-Headers": json.dumps([["content-type", "application/json"], ["lang", "python"]]),
            })
    else:
        wanted = sys.argv[6]
        # A durable consumer of our own inbox subject, like a comms node's.
        sub = await js.pull_subscribe(f"{prefix}.inbox.{py_node}", durable=py_node, stream=stream)
        for _ in range(20):
            try:
                messages = await sub.fetch(10, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                await msg.ack()
                headers = msg.headers or {}
                if headers.get("Comms-Correlation-Id") != wanted:
                    continue  # comms' own heartbeats and the like
                print(json.dumps({
                    "id": headers["Comms-Id"],
                    "from": headers["Comms-From"],
                    "to_kind": headers.get("Comms-To-Kind", "node"),
                    "to": headers.get("Comms-To", py_node),
                    "correlation_id": headers["Comms-Correlation-Id"],
                    "headers": json.loads(headers.get("Comms-Headers", "[]")),
                    "payload": msg.data.decode(),
                }))
                await nc.drain()
                return
        sys.exit("no answer arrived")
    await nc.drain()

asyncio.run(main())
"#;

fn python(args: &[&str]) -> Option<String> {
    if !python_available(&["nats"]) {
        return None;
    }
    let dir = scratch_dir("nats-interop");
    let script = dir.join("interop.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let output = Command::new("python3").arg(&script).args(args).output().expect("run python3");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "python3 interop.py {args:?} failed: {stderr}");
    Some(String::from_utf8(output.stdout).unwrap())
}

fn field<'a>(json: &'a str, name: &str) -> &'a str {
    // The script prints flat JSON; find `"name": "value"` without a JSON dependency.
    let start = json.find(&format!("\"{name}\": \"")).unwrap_or_else(|| panic!("no {name} in {json}"))
        + name.len()
        + 5;
    &json[start..start + json[start..].find('"').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_program_sends_to_a_node_and_reads_its_answer() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "interop");
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let config = deployment.transport_config("fetch_expires_ms = 500\n");
    let prefix = deployment.prefix.as_str();
    let node = Node::builder("comms-node")
        .transport_library("nats", library, &config)
        .static_peer("py-node", [("nats", format!("{prefix}.inbox.py-node").as_str())])
        .build()
        .await
        .unwrap();

    let stream = deployment.stream.as_str();
    if python(&["send", stream, prefix, "comms-node", "py-node"]).is_none() {
        node.close().await.unwrap();
        return;
    }
    let envelope =
        tokio::time::timeout(Duration::from_secs(10), node.receive_envelope()).await.unwrap().unwrap();
    assert_eq!(envelope.id.as_u128(), 0x1234abcd);
    assert_eq!(envelope.from.as_str(), "py-node");
    assert_eq!(envelope.header("lang"), Some("python"));
    assert_eq!(envelope.payload.as_slice(), br#"{"greeting": "hello from python"}"#);

    let answer = node
        .send_raw(
            "py-node",
            vec![("content-type".into(), "text/plain".into()), ("lang".into(), "rust".into())],
            b"hello from comms".to_vec(),
            Some(envelope.id),
        )
        .await
        .unwrap();
    let correlation = envelope.id.to_string();
    let printed = python(&["receive", stream, prefix, "comms-node", "py-node", &correlation]).unwrap();
    assert_eq!(field(&printed, "id"), answer.to_string(), "{printed}");
    assert_eq!(field(&printed, "from"), "comms-node", "{printed}");
    assert_eq!(field(&printed, "to_kind"), "node", "{printed}");
    assert_eq!(field(&printed, "to"), "py-node", "{printed}");
    assert_eq!(field(&printed, "payload"), "hello from comms", "{printed}");
    assert!(printed.contains(r#"["lang", "rust"]"#), "{printed}");
    node.close().await.unwrap();
}
