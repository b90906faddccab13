//! The fault-injection wrapper, configured from a config file, drives requests through 10 % loss
//! to success with retries.

use comms_host::{Node, Received, RequestOptions};
use comms_tests::{artifacts, scratch_dir, write_config};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_is_absorbed_by_retries() {
    let dir = scratch_dir("faults");
    let plugin_dirs = format!("plugin_dirs = [{:?}]", artifacts().plugin_dir.to_str().unwrap());
    let server_config = write_config(
        &dir,
        "server.toml",
        &format!("[node]\nid = \"server\"\n{plugin_dirs}\n[transports.memory]\naddress = \"memory://faulty-server\"\n"),
    );
    let server = Node::from_config(&server_config).await.unwrap();
    server
        .serve("double", |request: Received<u32>| async move { Ok::<_, String>(request.message * 2) })
        .await
        .unwrap();
    // Both directions lose 10 %: requests on the client's transport, responses on the server's
    // (wrapped the same way through its own config below).
    let client_config = write_config(
        &dir,
        "client.toml",
        &format!(
            "[node]\nid = \"client\"\n{plugin_dirs}\nrequest_timeout_ms = 150\nrequest_attempts = 8\n\
             request_backoff_ms = 5\n\n\
             [transports.memory]\naddress = \"memory://faulty-client\"\n\
             faults = {{ drop = 0.1, delay_ms = 1, jitter_ms = 2, seed = 1234 }}\n\n\
             [discovery]\npeers = [{{ id = \"server\", addresses = {{ memory = \"memory://faulty-server\" }} }}]\n"
        ),
    );
    let client = Node::from_config(&client_config).await.unwrap();
    let started = tokio::time::Instant::now();
    while !client.peers().iter().any(|p| p.record.services.contains(&"double".to_string())) {
        assert!(started.elapsed() < Duration::from_secs(10), "the service was never announced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tasks = Vec::new();
    for worker in 0..4u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u32 {
                let n = worker * 1000 + i;
                let doubled: u32 =
                    client.request("double", &n).await.unwrap_or_else(|e| panic!("request {n}: {e}"));
                assert_eq!(doubled, 2 * n);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // With 10 % loss some of the 400 requests needed a retry: prove the faults happened.
    let options =
        RequestOptions { timeout: Duration::from_millis(150), attempts: 1, backoff: Duration::ZERO };
    let mut failures_without_retries = 0;
    for n in 0..200u32 {
        if client.request_with::<_, u32>("double", &n, &options).await.is_err() {
            failures_without_retries += 1;
        }
    }
    assert!(failures_without_retries > 5, "without retries some requests fail: {failures_without_retries}");
    client.close().await.unwrap();
    server.close().await.unwrap();
}

#[tokio::test]
async fn a_bad_fault_config_names_the_key_and_file() {
    let dir = scratch_dir("bad-faults");
    let path = write_config(
        &dir,
        "node.toml",
        &format!(
            "[node]\nid = \"x\"\nplugin_dirs = [{:?}]\n[transports.tcp]\nfaults = {{ drop = 1.5 }}\n",
            artifacts().plugin_dir.to_str().unwrap()
        ),
    );
    let message = Node::from_config(&path).await.unwrap_err().to_string();
    assert!(message.contains("drop") && message.contains(&path.display().to_string()), "{message}");
    let path =
        write_config(&dir, "typo.toml", "[node]\nid = \"x\"\n[transports.tcp]\nfaults = { dorp = 0.1 }\n");
    let message = Node::from_config(&path).await.unwrap_err().to_string();
    assert!(message.contains("dorp") && message.contains("transports.tcp.faults"), "{message}");
}
