//! Interoperability: a Python program (redis-py) sends to a comms node by writing the documented
//! stream entry into its inbox, and reads the answer the node sent to the Python program's own
//! inbox. The script is the one `docs/redis.md` shows.

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, broker_available, python_available, scratch_dir};
use std::{process::Command, time::Duration};

const REDIS: &str = "127.0.0.1:6379";

/// `python3 interop.py send PREFIX COMMS_NODE PY_NODE` creates the Python program's inbox and
/// sends one message to the comms node; `... receive PREFIX COMMS_NODE PY_NODE CORRELATION`
/// prints (as JSON) the message the comms node sent back, the one answering CORRELATION.
const SCRIPT: &str = r#"
import json, sys, redis

stage, prefix, comms_node, py_node = sys.argv[1:5]
r = redis.Redis(host="127.0.0.1", port=6379)
my_inbox = f"{prefix}:inbox:{py_node}"

if stage == "send":
    # An inbox of our own, read through the consumer group "comms" like a comms node's.
    r.xgroup_create(my_inbox, "comms", id="0", mkstream=True)
    r.xadd(f"{prefix}:inbox:{comms_node}", {
        "v": "1",
        "id": "%032x" % 0x1234abcd,
        "from": py_node,
        "to_kind": "node",
        "to": comms_node,
        "headers": json.dumps([["content-type", "application/json"], ["lang", "python"]]),
        "payload": json.dumps({"greeting": "hello from python"}),
    }, nomkstream=True)
else:
    wanted = sys.argv[5]
    for _ in range(20):
        reply = r.xreadgroup("comms", "python", {my_inbox: ">"}, count=10, block=500)
        for _stream, entries in reply:
            for entry_id, raw in entries:
                fields = {k.decode(): v for k, v in raw.items()}
                r.xack(my_inbox, "comms", entry_id)
                r.xdel(my_inbox, entry_id)
                if fields.get("correlation_id", b"").decode() != wanted:
                    continue  # comms' own heartbeats and the like
                print(json.dumps({
                    "id": fields["id"].decode(),
                    "from": fields["from"].decode(),
                    # Left out when the message is for the inbox's own node.
                    "to_kind": fields.get("to_kind", b"node").decode(),
                    "to": fields.get("to", py_node.encode()).decode(),
                    "correlation_id": fields["correlation_id"].decode(),
                    "headers": json.loads(fields.get("headers", b"[]")),
                    "payload": fields["payload"].decode(),
                }))
                sys.exit(0)
    sys.exit("no answer arrived")
"#;

fn python(args: &[&str]) -> Option<String> {
    if !python_available(&["redis"]) {
        return None;
    }
    let dir = scratch_dir("redis-interop");
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
    if !broker_available("Redis", REDIS) {
        return;
    }
    let prefix =
        format!("comms-test-{}-{:06x}-interop", std::process::id(), rand::random::<u32>() & 0xff_ffff);
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let config = format!("prefix = \"{prefix}\"\nblock_ms = 200\n");
    let node = Node::builder("comms-node")
        .transport_library("redis", library, &config)
        .static_peer("py-node", [("redis", format!("{prefix}:inbox:py-node").as_str())])
        .build()
        .await
        .unwrap();

    if python(&["send", &prefix, "comms-node", "py-node"]).is_none() {
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
    let printed = python(&["receive", &prefix, "comms-node", "py-node", &correlation]).unwrap();
    assert_eq!(field(&printed, "id"), answer.to_string(), "{printed}");
    assert_eq!(field(&printed, "from"), "comms-node", "{printed}");
    assert_eq!(field(&printed, "to_kind"), "node", "{printed}");
    assert_eq!(field(&printed, "to"), "py-node", "{printed}");
    assert_eq!(field(&printed, "payload"), "hello from comms", "{printed}");
    assert!(printed.contains(r#"["lang", "rust"]"#), "{printed}");
    node.close().await.unwrap();

    comms_tests::delete_redis_keys(&prefix).await;
}
