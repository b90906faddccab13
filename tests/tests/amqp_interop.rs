//! Interoperability: a Python program (pika) sends a message in the documented broker-side
//! format to a comms node's inbox, and reads one a comms node sent, field by field.

use comms_host::PluginLibrary;
use comms_plugin_api::{Destination, Envelope, ErrorCode, MessageId, NodeId, Payload};
use comms_tests::{artifacts, broker_available, python_available};
use std::{
    process::{Command, Stdio},
    time::Duration,
};

/// Declares its own inbox, publishes one message to the comms node's inbox, then prints the
/// first message it gets as JSON.
const PYTHON: &str = r#"
import json, sys, pika
comms_inbox, my_queue = sys.argv[1], sys.argv[2]
connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
channel = connection.channel()
channel.queue_declare(queue=my_queue, durable=True, arguments={"x-expires": 60000})
properties = pika.BasicProperties(
    message_id="0123456789abcdef0123456789abcdef",
    content_type="application/json",
    delivery_mode=2,
    reply_to=my_queue,
    headers={"comms-from": "python-node", "comms-to-kind": "node", "comms-to": sys.argv[3],
             "comms-headers": [["content-type", "application/json"], ["lang", "python"]]},
)
channel.basic_publish(exchange="", routing_key=comms_inbox, body=b'{"hello":"from python"}',
                      properties=properties, mandatory=True)
print("published", flush=True)
for method, props, body in channel.consume(my_queue, inactivity_timeout=20):
    if method is None:
        sys.exit("nothing arrived from comms within 20 s")
    channel.basic_ack(method.delivery_tag)
    print(json.dumps({"message_id": props.message_id, "correlation_id": props.correlation_id,
                      "reply_to": props.reply_to, "content_type": props.content_type,
                      "delivery_mode": props.delivery_mode,
                      "headers": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in props.headers.items()},
                      "body": body.decode()}), flush=True)
    break
connection.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_program_speaks_the_documented_format_both_ways() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") || !python_available(&["pika"]) {
        return;
    }
    let library = PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"));
    let node = format!("interop-rust-{}", std::process::id());
    let python_queue = format!("interop-python-{}", std::process::id());
    let comms = library.new_transport(&NodeId::new(&node), "amqp", "inbox_expires_ms = 60000").await.unwrap();
    let inbox = comms.info().local_address.clone();
    assert_eq!(inbox, format!("comms.inbox.{node}"));

    let args = [inbox.clone(), python_queue.clone(), node.clone()];
    let python = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg("-c").arg(PYTHON).args(args).stderr(Stdio::inherit()).output()
    });

    // Python -> comms.
    let batch = tokio::time::timeout(Duration::from_secs(20), comms.receive(10))
        .await
        .expect("the Python message arrives")
        .unwrap();
    let got = &batch[0].envelope;
    assert_eq!(got.id, MessageId::from_u128(0x0123456789abcdef0123456789abcdef));
    assert_eq!(got.from.as_str(), "python-node");
    assert_eq!(got.to, Destination::Node(NodeId::new(&node)));
    assert_eq!(got.headers, [("content-type", "application/json"), ("lang", "python")].into_iter().collect());
    assert_eq!(got.payload.as_slice(), br#"{"hello":"from python"}"#);

    // comms -> Python: the queue exists once Python has declared it.
    let reply = Envelope::new(
        MessageId::from_u128(0xfeed),
        NodeId::new(&node),
        Destination::Node(NodeId::new("python-node")),
        Payload::from(br#"{"hello":"from rust"}"#.to_vec()),
    )
    .with_correlation_id(Some(got.id))
    .with_headers(vec![("content-type".into(), "application/json".into()), ("n".into(), "1".into())]);
    let started = std::time::Instant::now();
    loop {
        match comms.send(&python_queue, reply.clone()).await {
            Ok(()) => break,
            Err(error)
                if error.code == ErrorCode::UNREACHABLE && started.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("sending to the Python program failed: {error}"),
        }
    }
    let finished =
        tokio::time::timeout(Duration::from_secs(30), python).await.expect("the Python program finishes");
    let finished = finished.unwrap().expect("run python3");
    let output = String::from_utf8_lossy(&finished.stdout).into_owned();
    assert!(finished.status.success(), "python failed; it printed: {output}");
    let line = output.lines().last().unwrap_or_default();
    let seen: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {output}"));
    assert_eq!(seen["message_id"], format!("{:032x}", 0xfeed));
    assert_eq!(seen["correlation_id"], "0123456789abcdef0123456789abcdef");
    assert_eq!(seen["reply_to"], inbox);
    assert_eq!(seen["content_type"], "application/json");
    assert_eq!(seen["delivery_mode"], 2);
    assert_eq!(seen["headers"]["comms-from"], node.as_str());
    assert_eq!(seen["headers"]["comms-to-kind"], "node");
    assert_eq!(seen["headers"]["comms-to"], "python-node");
    assert_eq!(
        seen["headers"]["comms-headers"],
        serde_json::json!([["content-type", "application/json"], ["n", "1"]])
    );
    assert_eq!(seen["body"], r#"{"hello":"from rust"}"#);
    comms.close().await.unwrap();
}
