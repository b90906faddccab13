//! Loading plugins at run time: several at once, incompatible ones refused clearly, the host
//! unharmed by any of it.

use comms_host::{BuildError, Node, PluginLibrary};
use comms_plugin_api::host_side::LoadError;
use comms_tests::{artifacts, scratch_dir, write_config};

#[tokio::test]
async fn two_separately_built_plugins_work_in_one_host_at_once() {
    let artifacts = artifacts();
    let dir = scratch_dir("two-plugins");
    let tcp = PluginLibrary::load(&artifacts.tcp_plugin).expect("tcp loads");
    let uds = PluginLibrary::load(&artifacts.uds_plugin).expect("uds (third-party, built on its own) loads");
    assert_eq!(tcp.description().name, "tcp");
    assert_eq!(uds.description().name, "uds");

    let b_socket = dir.join("b.sock");
    let b_socket = b_socket.to_str().unwrap();
    let b = Node::builder("b")
        .transport_library("uds", uds.clone(), &format!("listen = {b_socket:?}"))
        .build()
        .await
        .unwrap();
    let c = Node::builder("c").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let c_address = c.transports()[0].local_address.clone();
    // `a` has both transports and reaches each peer through the one that peer listens on.
    let a_socket = dir.join("a.sock");
    let a = Node::builder("a")
        .transport_library("tcp", tcp, "")
        .transport_library("uds", uds, &format!("listen = {:?}", a_socket.to_str().unwrap()))
        .static_peer("b", [("uds", b_socket)])
        .static_peer("c", [("tcp", c_address.as_str())])
        .build()
        .await
        .unwrap();
    let plugins: Vec<String> = a.transports().into_iter().map(|t| t.plugin).collect();
    assert_eq!(plugins, ["tcp", "uds"]);

    for i in 0..100u32 {
        a.send("b", &format!("to b over uds {i}")).await.unwrap();
        a.send("c", &format!("to c over tcp {i}")).await.unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(b.receive::<String>().await.unwrap().message, format!("to b over uds {i}"));
        assert_eq!(c.receive::<String>().await.unwrap().message, format!("to c over tcp {i}"));
    }
    for node in [a, b, c] {
        node.close().await.unwrap();
    }
}

#[test]
fn plugin_built_against_another_interface_version_is_refused_clearly() {
    let path = &artifacts().wrong_version_plugin;
    let error = PluginLibrary::load(path).unwrap_err();
    assert!(matches!(error, LoadError::IncompatibleVersion { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "names the file: {message}");
    assert!(message.contains("0.7.0"), "names the plugin's version: {message}");
    assert!(message.contains(PluginLibrary::interface_version()), "names the host's version: {message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
}

#[test]
fn plugin_with_a_different_layout_is_refused_with_the_first_mismatch() {
    let path = &artifacts().wrong_layout_plugin;
    let error = PluginLibrary::load(path).unwrap_err();
    let LoadError::IncompatibleLayout { first_mismatch, details, .. } = &error else {
        panic!("expected a layout error, got {error}");
    };
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("first mismatch"), "{message}");
    assert_eq!(message.lines().count(), 1, "the short form is one line: {message}");
    assert!(!first_mismatch.is_empty() && first_mismatch.len() <= 200, "{first_mismatch}");
    assert!(details.lines().count() > 3, "the long form keeps the full report");
    assert_eq!(error.details(), Some(details.as_str()));
}

#[test]
fn files_that_are_not_plugins_get_clear_errors_and_the_host_keeps_working() {
    let dir = scratch_dir("not-plugins");
    let text = write_config(&dir, "libcomms_text.so", "not a library");
    let error = PluginLibrary::load(&text).unwrap_err();
    assert!(matches!(error, LoadError::NotAPlugin { .. }), "{error:?}");
    assert!(error.to_string().contains("is not a comms plugin"), "{error}");

    let missing = dir.join("libcomms_missing.so");
    let error = PluginLibrary::load(&missing).unwrap_err();
    assert!(matches!(error, LoadError::NotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("libcomms_missing.so"), "{error}");

    // A real shared library that is not a comms plugin: the test binary's own libc will do.
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib/libc.so.6"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    if let Some(libc) = libc {
        let error = PluginLibrary::load(&libc).unwrap_err();
        assert!(error.to_string().contains("exports no abi_stable root module"), "{error}");
    }

    // After all of that, a good plugin still loads and works in this same process.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
        let node = Node::builder("survivor").transport_library("tcp", tcp, "").build().await.unwrap();
        node.send("survivor", "still here").await.unwrap();
        assert_eq!(node.receive::<String>().await.unwrap().message, "still here");
        node.close().await.unwrap();
    });
}

#[tokio::test]
async fn node_config_naming_an_incompatible_plugin_fails_with_the_path() {
    let artifacts = artifacts();
    let dir = scratch_dir("config-incompatible");
    let config = write_config(
        &dir,
        "node.toml",
        &format!(
            "[node]\nid = \"x\"\n[transports.old]\npath = {:?}\n",
            artifacts.wrong_version_plugin.to_str().unwrap()
        ),
    );
    let error = Node::from_config(&config).await.unwrap_err();
    assert!(matches!(error, BuildError::Load { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("transport `old`"), "{message}");
    assert!(message.contains("0.7.0"), "{message}");
}

#[test]
fn comms_plugins_inspect_exits_zero_for_a_plugin_and_nonzero_with_the_reason_otherwise() {
    let artifacts = artifacts();
    let ok = std::process::Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect"])
        .arg(&artifacts.uds_plugin)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("name:        uds"), "{stdout}");

    for (path, expected) in
        [(&artifacts.wrong_version_plugin, "0.7.0"), (&artifacts.wrong_layout_plugin, "first mismatch")]
    {
        let refused = std::process::Command::new(&artifacts.comms_bin)
            .args(["plugins", "inspect"])
            .arg(path)
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(expected) && stderr.contains(&path.display().to_string()), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "short without --verbose: {stderr}");
    }
    let verbose = std::process::Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect", "--verbose"])
        .arg(&artifacts.wrong_layout_plugin)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&verbose.stderr).lines().count() > 3, "--verbose adds the long form");

    let list = std::process::Command::new(&artifacts.comms_bin)
        .args(["plugins", "list", "--dir"])
        .arg(&artifacts.plugin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success());
    assert!(stdout.contains("tcp") && stdout.contains("uds") && stdout.contains("panicking"), "{stdout}");
}
