//! Helpers shared by the cross-crate tests and benchmarks.
//!
//! The tests load plugin libraries exactly as users do, so they need the `.so` files and the
//! `comms` binary on disk. [`artifacts`] builds them with the same cargo and profile that runs
//! the tests (once per test binary under `cargo test`, once per run under `cargo nextest run`):
//! the workspace plugins and the third-party example plugin (a separate cargo project);
//! [`Artifacts::contract_fixtures`] builds, on first use, the plugins built against other
//! versions of the plugin contract (`tests/fixtures`).

pub mod bench;
pub mod child_process;
pub mod connecting;
pub mod every_plugin;
mod logs;
pub mod nat_network;
pub mod noise_discovery;
pub mod threads;

pub use logs::{capture_logs, CapturedLogs};

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
};

/// Paths of everything the tests load or run.
#[derive(Debug)]
pub struct Artifacts {
    /// Directory with the workspace's plugin libraries and the `comms` binary.
    pub plugin_dir: PathBuf,
    /// The `comms` command.
    pub comms_bin: PathBuf,
    /// `libcomms_tcp.so`.
    pub tcp_plugin: PathBuf,
    /// `libcomms_memory.so`.
    pub memory_plugin: PathBuf,
    /// `libcomms_redis.so`.
    pub redis_plugin: PathBuf,
    /// `libcomms_amqp.so`.
    pub amqp_plugin: PathBuf,
    /// `libcomms_sqlite.so`.
    pub sqlite_plugin: PathBuf,
    /// `libcomms_udp.so`.
    pub udp_plugin: PathBuf,
    /// `libcomms_kademlia.so`: discovery by a Kademlia DHT.
    pub kademlia_plugin: PathBuf,
    /// `libcomms_gossip.so`: discovery by SWIM-style gossip.
    pub gossip_plugin: PathBuf,
    /// `libcomms_compress.so`: the zstd compression layer.
    pub compress_plugin: PathBuf,
    /// `libcomms_chunk.so`: the layer that splits large messages into parts.
    pub chunk_plugin: PathBuf,
    /// `libcomms_faults.so`: the fault-injection layer.
    pub faults_plugin: PathBuf,
    /// `libcomms_uds.so`, built from `examples/third-party-plugin` on its own.
    pub uds_plugin: PathBuf,
    /// `libcomms_fixture_panicking.so`.
    pub panicking_plugin: PathBuf,
    /// Built on first use: see [`Artifacts::contract_fixtures`].
    contract_fixtures: OnceLock<ContractFixtures>,
    /// Built on first use: see [`Artifacts::nats_plugin`].
    nats_plugin: OnceLock<PathBuf>,
    /// Built on first use: see [`Artifacts::postgres_plugin`].
    postgres_plugin: OnceLock<PathBuf>,
    /// Built on first use: see [`Artifacts::tcp_next_plugin`].
    tcp_next_plugin: OnceLock<PathBuf>,
}

/// Plugins built against other versions of the plugin contract than the workspace's
/// `comms-core`, each a separate cargo project outside the workspace (`tests/fixtures`).
#[derive(Debug)]
pub struct ContractFixtures {
    /// `libcomms_fixture_v1.so`: a transport built from the frozen contract 1.0
    /// (`tests/fixtures/contract-v1`) alone, with its own lockfile. Must load and pass the
    /// conformance suite in every 1.x host.
    pub v1_plugin: PathBuf,
    /// The same transport built for contract 1.3 (the next minor): one more optional `Transport` method
    /// (`flush`) and root-module field (`config_help`). Loads; the host will not use those.
    pub next_minor_plugin: PathBuf,
    /// Built for contract 2.0: refused.
    pub next_major_plugin: PathBuf,
    /// Built for a contract 1.0 whose `Envelope` has one field more: refused.
    pub wrong_layout_plugin: PathBuf,
}

impl Artifacts {
    /// Builds (once per process) and returns `libcomms_nats.so` from `plugins/nats`: a plugin
    /// crate outside the workspace with its own lockfile, built on its own as its users build it.
    pub fn nats_plugin(&self) -> &Path {
        self.nats_plugin.get_or_init(|| build_shipped_plugin("nats", "comms_nats"))
    }

    /// Builds (once per process) and returns `libcomms_postgres.so` from `plugins/postgres`,
    /// like [`Artifacts::nats_plugin`].
    pub fn postgres_plugin(&self) -> &Path {
        self.postgres_plugin.get_or_init(|| build_shipped_plugin("postgres", "comms_postgres"))
    }

    /// Builds (once per process) and returns `libcomms_tcp_next.so`: the TCP plugin's source
    /// built on its own as version 0.1.1 (`tests/fixtures/tcp-next`), the upgrade the hot swap
    /// test installs.
    pub fn tcp_next_plugin(&self) -> &Path {
        self.tcp_next_plugin.get_or_init(|| {
            build_once_per_run("tcp-next", || {
                let manifest = "tests/fixtures/tcp-next/Cargo.toml";
                cargo(&["build", "--locked", "--manifest-path", manifest], &target_dir());
            });
            library(&target_dir().join(profile().0), "comms_tcp_next")
        })
    }

    /// Builds (once per process) and returns the contract fixtures.
    ///
    /// They share one target directory, `target/fixtures`, so that abi_stable is compiled once
    /// for all of them (they share nothing with the workspace's lockfile). The three variants of
    /// the mismatched fixture are one crate with different features and the same library name:
    /// each is copied to `target/fixtures/<feature>/` right after its build.
    pub fn contract_fixtures(&self) -> &ContractFixtures {
        self.contract_fixtures.get_or_init(|| {
            let fixtures = target_dir().join("fixtures");
            let (profile, _) = profile();
            let variants = [
                ("next-minor", "fixture-next-minor"),
                ("next-major", "fixture-next-major"),
                ("wrong-layout", "fixture-wrong-layout"),
            ];
            build_once_per_run("contract-fixtures", || {
                cargo(
                    &["build", "--locked", "--manifest-path", "tests/fixtures/v1-plugin/Cargo.toml"],
                    &fixtures,
                );
                for (feature, plugin_name) in variants {
                    let manifest = "tests/fixtures/mismatched-plugin/Cargo.toml";
                    cargo(
                        &["build", "--locked", "--manifest-path", manifest, "--features", feature],
                        &fixtures,
                    );
                    let built = library(&fixtures.join(profile), "comms_fixture_mismatched");
                    copy_library(
                        &built,
                        &library(&fixtures.join(feature), "comms_fixture_mismatched"),
                        plugin_name,
                    );
                }
            });
            let variant = |feature: &str| library(&fixtures.join(feature), "comms_fixture_mismatched");
            ContractFixtures {
                v1_plugin: library(&fixtures.join(profile), "comms_fixture_v1"),
                next_minor_plugin: variant("next-minor"),
                next_major_plugin: variant("next-major"),
                wrong_layout_plugin: variant("wrong-layout"),
            }
        })
    }
}

/// Runs `build` (cargo builds of what the tests load) once per test run and at most once at a
/// time, across processes.
///
/// `cargo test` runs one test binary after the other, and each builds what it needs once
/// (cargo finds it up to date: about a second). `cargo nextest run` (the README's test command)
/// runs every test in a process of its own, two at a time: the builds of two processes would
/// race (one copying a fixture variant while the other rebuilds it), and a second per test adds
/// up over 800 tests. So the build holds a file lock in the target directory, and under nextest
/// it leaves a stamp named after the run (`NEXTEST_RUN_ID`) that the run's other processes
/// find and skip the build for.
fn build_once_per_run(what: &str, build: impl FnOnce()) {
    let dir = target_dir().join("test-builds");
    std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("cannot create {}: {error}", dir.display()));
    let lock_path = dir.join(format!("{what}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|error| panic!("cannot create {}: {error}", lock_path.display()));
    // Released when `lock` is closed, at the end of this function (or if the process dies).
    // SAFETY: flock only reads the descriptor, which `lock` keeps open for the call.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if locked != 0 {
        panic!("cannot lock {}: {}", lock_path.display(), std::io::Error::last_os_error());
    }
    let Some(run) = std::env::var_os("NEXTEST_RUN_ID") else { return build() };
    let stamp = dir.join(format!("{what}.run-{}", run.to_string_lossy()));
    if stamp.exists() {
        return;
    }
    build();
    // The stamps of earlier runs are of no use any more.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let earlier = format!("{what}.run-");
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&earlier) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    std::fs::write(&stamp, b"").unwrap_or_else(|error| panic!("cannot write {}: {error}", stamp.display()));
}

/// Builds `plugins/<directory>` with its own lockfile (`--locked`) into the shared target
/// directory, where it reuses whatever the workspace already compiled with the same versions.
fn build_shipped_plugin(directory: &str, library_name: &str) -> PathBuf {
    build_once_per_run(directory, || {
        let manifest = format!("plugins/{directory}/Cargo.toml");
        cargo(&["build", "--locked", "--manifest-path", &manifest], &target_dir());
    });
    library(&target_dir().join(profile().0), library_name)
}

/// Copies the library `from` to `to`, checking that it is the variant named `plugin_name`.
///
/// The copy is written beside `to` and renamed over it, so that a process that has the old file
/// loaded keeps its mapping.
fn copy_library(from: &Path, to: &Path, plugin_name: &str) {
    let bytes = std::fs::read(from).unwrap_or_else(|error| panic!("cannot read {}: {error}", from.display()));
    assert!(
        bytes.windows(plugin_name.len()).any(|window| window == plugin_name.as_bytes()),
        "{} is not the `{plugin_name}` variant: did another build of the fixture run at the same time?",
        from.display()
    );
    let dir = to.parent().expect("a library path has a directory");
    std::fs::create_dir_all(dir).unwrap_or_else(|error| panic!("cannot create {}: {error}", dir.display()));
    let partial = to.with_extension("partial");
    std::fs::write(&partial, &bytes)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", partial.display()));
    std::fs::rename(&partial, to)
        .unwrap_or_else(|error| panic!("cannot rename to {}: {error}", to.display()));
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The cargo target directory the tests build into (`$CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

fn profile() -> (&'static str, &'static [&'static str]) {
    if cfg!(debug_assertions) {
        ("debug", &[])
    } else {
        ("release", &["--release"])
    }
}

/// Whether `name` is one of the variables cargo sets for the test it runs (the package's
/// manifest, name and version, `OUT_DIR`, ...), which a shell that runs cargo does not have.
///
/// Build scripts ask to be run again when such a variable changes (ring's and aws-lc-sys's watch
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, `OUT_DIR`): a cargo started with the test's values
/// rebuilt them and everything above them (TLS, the host, every plugin: about a minute), and
/// the next `cargo test` rebuilt them back.
fn set_by_cargo_for_the_test(name: &str) -> bool {
    ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_"].iter().any(|prefix| name.starts_with(prefix))
        || [
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&name)
}

/// Runs the cargo that runs the tests, with the tests' profile, in the repository root, in the
/// environment the tests were started from (see `set_by_cargo_for_the_test`); panics if it
/// fails.
pub fn cargo(args: &[&str], target: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(&cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_the_test) {
            command.env_remove(name);
        }
    }
    let status = command
        .args(args)
        .args(profile().1)
        .arg("--target-dir")
        .arg(target)
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|error| panic!("cannot run {cargo}: {error}"));
    assert!(status.success(), "cargo {} failed", args.join(" "));
}

fn library(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX))
}

/// The plugins of the workspace the tests load: package, library name.
const WORKSPACE_PLUGINS: [(&str, &str); 12] = [
    // Only ever a cdylib, without tests: `cargo test` does not build it (see `artifacts`).
    ("comms-faults-plugin", "comms_faults"),
    ("comms-tcp", "comms_tcp"),
    ("comms-memory", "comms_memory"),
    ("comms-redis", "comms_redis"),
    ("comms-amqp", "comms_amqp"),
    ("comms-sqlite", "comms_sqlite"),
    ("comms-udp", "comms_udp"),
    ("comms-kademlia", "comms_kademlia"),
    ("comms-gossip", "comms_gossip"),
    ("comms-compress", "comms_compress"),
    ("comms-chunk", "comms_chunk"),
    ("comms-fixture-panicking", "comms_fixture_panicking"),
];

/// Puts the file `from` at `to` as cargo copies up what it built: a hard link (a copy where
/// that fails), made beside `to` and renamed over it, so that a process that has the old file
/// loaded keeps its mapping.
fn link_up(from: &Path, to: &Path) {
    use std::os::unix::fs::MetadataExt;
    let identity = |path: &Path| std::fs::metadata(path).ok().map(|file| (file.dev(), file.ino()));
    // Already linked (cargo rebuilt nothing since): renaming a link over another link to the
    // same file does nothing at all, and would leave the new link behind.
    if identity(to).is_some() && identity(to) == identity(from) {
        return;
    }
    let beside = to.with_extension("linking");
    let _ = std::fs::remove_file(&beside);
    if std::fs::hard_link(from, &beside).is_err() {
        std::fs::copy(from, &beside).unwrap_or_else(|error| {
            panic!("cannot copy {} to {}: {error}", from.display(), beside.display())
        });
    }
    std::fs::rename(&beside, to)
        .unwrap_or_else(|error| panic!("cannot rename {} to {}: {error}", beside.display(), to.display()));
}

/// Builds (once per process) and returns every artifact the tests need.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        let target = target_dir();
        let (profile, _) = profile();
        let plugin_dir = target.join(profile);
        // The tests' build (debug): exactly what the README's test command,
        // `cargo nextest run --workspace`, builds before it runs a test (it runs
        // `cargo test --workspace --no-run`), so that this finds it all up to date. Any other
        // set of packages unifies other features (the tests crate asks comms-plugin-api for
        // `testing`, a dev-dependency for more) and rebuilds every plugin, and the next
        // `cargo nextest run` rebuilds them back: two minutes of a CI run, with every test that
        // needs a plugin waiting for it. That build leaves the plugins in `deps/` (cargo copies
        // up only what was asked for by name, and the `comms` binary, which tests use): they
        // are linked up beside the binary, where a `cargo build` would put them. It does not
        // build the faults plugin at all (a cdylib without tests), whose own build shares
        // nothing with it that features could change.
        //
        // The benchmarks' build (release): only the plugins and the `comms` command, with the
        // features the tests crate builds the host with (`otel`, so that the library compiles
        // once), rather than every test binary in release.
        build_once_per_run("workspace-plugins", || {
            if cfg!(debug_assertions) {
                cargo(&["test", "--workspace", "--no-run"], &target);
                let (faults, tested) = WORKSPACE_PLUGINS.split_first().expect("plugins");
                cargo(&["build", "-p", faults.0], &target);
                for (_, name) in tested {
                    link_up(&library(&plugin_dir.join("deps"), name), &library(&plugin_dir, name));
                }
            } else {
                let mut build = vec!["build", "--features", "comms-host/otel", "-p", "comms-host"];
                build.extend(WORKSPACE_PLUGINS.iter().flat_map(|(package, _)| ["-p", *package]));
                cargo(&build, &target);
            }
            cargo(&["build", "--manifest-path", "examples/third-party-plugin/Cargo.toml"], &target);
        });
        Artifacts {
            comms_bin: plugin_dir.join(format!("comms{}", std::env::consts::EXE_SUFFIX)),
            tcp_plugin: library(&plugin_dir, "comms_tcp"),
            memory_plugin: library(&plugin_dir, "comms_memory"),
            redis_plugin: library(&plugin_dir, "comms_redis"),
            amqp_plugin: library(&plugin_dir, "comms_amqp"),
            sqlite_plugin: library(&plugin_dir, "comms_sqlite"),
            udp_plugin: library(&plugin_dir, "comms_udp"),
            kademlia_plugin: library(&plugin_dir, "comms_kademlia"),
            gossip_plugin: library(&plugin_dir, "comms_gossip"),
            compress_plugin: library(&plugin_dir, "comms_compress"),
            chunk_plugin: library(&plugin_dir, "comms_chunk"),
            faults_plugin: library(&plugin_dir, "comms_faults"),
            uds_plugin: library(&plugin_dir, "comms_uds"),
            panicking_plugin: library(&plugin_dir, "comms_fixture_panicking"),
            contract_fixtures: OnceLock::new(),
            nats_plugin: OnceLock::new(),
            postgres_plugin: OnceLock::new(),
            tcp_next_plugin: OnceLock::new(),
            plugin_dir,
        }
    })
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("comms-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A loopback address with a port that is free right now.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").to_string()
}

/// An address on loopback where every connection is refused, for as long as the returned socket
/// lives: the socket holds the port bound without listening. A port from [`free_address`] is
/// free again once it returns: another test's listener may take it, or a dial to it may connect
/// to itself (its ephemeral source port being that same port), and a peer meant to be
/// unreachable then answers.
pub fn refusing_address() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.bind(([127, 0, 0, 1], 0).into()).expect("bind an ephemeral port");
    let address = socket.local_addr().expect("local address").to_string();
    (socket, address)
}

/// Two nodes named `sender` and `receiver` over the TCP plugin loaded from the built artifacts,
/// on loopback, each a static peer of the other. `configure` adjusts each builder (the plugin's
/// threads, the inbox) before it is built.
pub async fn tcp_node_pair(
    sender: &str,
    receiver: &str,
    configure: impl Fn(comms_host::NodeBuilder) -> comms_host::NodeBuilder,
) -> (comms_host::Node, comms_host::Node) {
    let dir = artifacts().plugin_dir.clone();
    let receiver_address = free_address();
    let sending = configure(comms_host::Node::builder(sender).plugin_dir(&dir))
        .transport("tcp", "tcp", r#"listen = "127.0.0.1:0""#)
        .static_peer(receiver, [("tcp", receiver_address.as_str())])
        .build()
        .await
        .unwrap_or_else(|error| panic!("building node {sender}: {error}"));
    let sender_address = sending.transports()[0].local_address.clone();
    let receiving = configure(comms_host::Node::builder(receiver).plugin_dir(&dir))
        .transport("tcp", "tcp", &format!("listen = \"{receiver_address}\""))
        .static_peer(sender, [("tcp", sender_address.as_str())])
        .build()
        .await
        .unwrap_or_else(|error| panic!("building node {receiver}: {error}"));
    (sending, receiving)
}

/// A loopback address with a UDP port that is free right now.
pub fn free_udp_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address").to_string()
}

/// `count` nodes named `<prefix>-<n>`, each with the loaded TCP plugin (loopback, any port) and
/// the discovery plugin `discovery`, node `n` configured with `discovery_config(n)`; built one
/// after the other, in order.
pub async fn nodes_with_discovery(
    prefix: &str,
    count: usize,
    discovery: &comms_host::PluginLibrary,
    discovery_config: impl Fn(usize) -> String,
) -> Vec<comms_host::Node> {
    let tcp =
        comms_host::PluginLibrary::load(&artifacts().tcp_plugin).unwrap_or_else(|error| panic!("{error}"));
    let mut nodes = Vec::with_capacity(count);
    for n in 0..count {
        let node = comms_host::Node::builder(format!("{prefix}-{n}").as_str())
            .transport_library("tcp", tcp.clone(), "")
            .discovery_library(discovery.clone(), &discovery_config(n))
            .build()
            .await
            .unwrap_or_else(|error| panic!("node {prefix}-{n}: {error}"));
        nodes.push(node);
    }
    nodes
}

/// Writes a config file and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// The transport's own counter `name` in its `stats()` (0 when it has none).
pub fn counter(transport: &comms_plugin_api::host_side::LoadedTransport, name: &str) -> u64 {
    let stats = transport.stats().transport;
    stats.counters.iter().find(|(counter, _)| counter == name).map_or(0, |(_, value)| *value)
}

/// Whether the broker at `address` (`host:port`) answers a TCP connection. In CI (`CI=true`) an
/// unreachable broker is a failure, never a silent skip; elsewhere the caller skips the test and
/// this prints why.
pub fn broker_available(name: &str, address: &str) -> bool {
    let reachable = address
        .parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|socket| {
            std::net::TcpStream::connect_timeout(&socket, std::time::Duration::from_secs(2)).ok()
        })
        .is_some();
    if reachable {
        return true;
    }
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{name} at {address} is not reachable, and in CI a broker test must not skip");
    }
    eprintln!("SKIPPED: {name} at {address} is not reachable (outside CI broker tests skip)");
    false
}

/// The Redis server of the broker tests.
pub const REDIS: &str = "127.0.0.1:6379";

/// The NATS server (with JetStream) of the NATS plugin's tests.
pub const NATS: &str = "127.0.0.1:4222";

/// The PostgreSQL server of the PostgreSQL plugin's tests (trust authentication, database `test`).
pub const POSTGRES: &str = "127.0.0.1:5432";

/// Deletes every key under `prefix` on [`REDIS`] (the streams and records a Redis test leaves
/// behind), in chunks of 500 so that a suite's thousands of keys fit a command.
pub async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::open(format!("redis://{REDIS}")).expect("a valid Redis URL");
    let mut connection = client.get_multiplexed_async_connection().await.expect("Redis connection");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut connection).await.expect("KEYS");
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut connection).await.expect("DEL");
    }
}

/// What a point-to-point transport without acknowledgements, durability, reliability, native
/// topics or encryption skips (TCP with plain links).
pub const POINT_TO_POINT_SKIPS: [&str; 7] = [
    "batches_and_sends_at_once",
    "redelivery_after_reject",
    "durable_resume",
    "reliable_delivery",
    "topic_isolation",
    "topic_fan_out",
    "encrypted_links",
];

/// The conformance cases an ordered, reliable point-to-point transport with plain links (memory,
/// UDP in reliable mode) skips: those of acknowledgements, durability, native topics, batched
/// sends and encryption.
pub const ORDERED_RELIABLE_SKIPS: [&str; 6] = [
    "batches_and_sends_at_once",
    "redelivery_after_reject",
    "durable_resume",
    "topic_isolation",
    "topic_fan_out",
    "encrypted_links",
];

/// Starts `command` and returns once a line containing `ready` appears on its standard error
/// (after which its standard error is discarded). Panics if the process ends first.
pub fn start_and_wait_for(command: std::process::Command, ready: &str) -> std::process::Child {
    start_and_follow(command, ready).0
}

/// [`start_and_wait_for`], with the lines the process writes to its standard error after
/// `ready`, one by one (the first 1024 not yet taken; later ones are dropped until there is room).
pub fn start_and_follow(
    mut command: std::process::Command,
    ready: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = command.stderr(std::process::Stdio::piped()).spawn().expect("start the process");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    while !line.contains(ready) {
        line.clear();
        let read = stderr.read_line(&mut line).expect("read the process's stderr");
        assert!(read > 0, "{command:?} exited before printing `{ready}`");
    }
    let (lines, receiver) = std::sync::mpsc::sync_channel(1024);
    // Read to the end even when nobody listens (lines beyond the channel's room are dropped), so
    // that the process never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.try_send(line);
        }
    });
    (child, receiver)
}

/// An HTTP response as a test reads it: the status line, the whole head, the body.
#[derive(Debug)]
pub struct HttpResponse {
    /// `HTTP/1.1 200 OK`, say.
    pub status: String,
    /// The status line and the headers.
    pub head: String,
    /// Everything after the blank line.
    pub body: String,
}

/// Sends `request` (raw bytes: the request line, headers and blank line) to `address`, reads
/// the response to the end of the connection and checks that its `Content-Length`, when there
/// is one, matches the body.
pub async fn http(address: std::net::SocketAddr, request: &str) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect to the HTTP endpoint");
    stream.write_all(request.as_bytes()).await.expect("write the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read the response");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let length = head.lines().find_map(|line| line.strip_prefix("Content-Length: "));
    if let Some(length) = length {
        assert_eq!(length.parse::<usize>().expect("a number"), body.len(), "Content-Length matches the body");
    }
    let status = head.lines().next().unwrap_or_default().to_string();
    HttpResponse { status, head: head.to_string(), body: body.to_string() }
}

/// The next event of `discovery` about node `id` (events about other nodes are skipped);
/// panics if none comes within `limit` or the discovery closes.
pub async fn next_event_about(
    discovery: &comms_plugin_api::host_side::LoadedDiscovery,
    id: &str,
    limit: std::time::Duration,
) -> comms_plugin_api::PeerEvent {
    tokio::time::timeout(limit, async {
        loop {
            let event = discovery.next_event().await.expect("the discovery works").expect("discovery open");
            if event.record.id.as_str() == id {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event about {id} within {limit:?}"))
}

/// A child process that a failing test does not leave running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `python3` runs and can import every module of `modules` (e.g. `["redis"]`). In CI
/// (`CI=true`) a missing interpreter or module is a failure, never a silent skip; elsewhere the
/// caller skips the test and this prints why.
pub fn python_available(modules: &[&str]) -> bool {
    let imports =
        if modules.is_empty() { "pass".to_string() } else { format!("import {}", modules.join(", ")) };
    let problem = match Command::new("python3").arg("-c").arg(&imports).output() {
        Err(error) => format!("cannot run python3 ({error})"),
        Ok(output) if output.status.success() => return true,
        Ok(output) => format!(
            "python3 cannot `{imports}` ({}); `python3 -m pip install {}` installs them",
            String::from_utf8_lossy(&output.stderr).trim().lines().last().unwrap_or_default(),
            modules.join(" ")
        ),
    };
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{problem}, and in CI a Python interoperability test must not skip");
    }
    eprintln!("SKIPPED: {problem} (outside CI these tests skip)");
    false
}

#[cfg(test)]
mod tests {
    use super::{link_up, scratch_dir, set_by_cargo_for_the_test};
    use std::{io::Read, os::unix::fs::MetadataExt};

    #[test]
    fn a_plugin_linked_up_replaces_the_old_file_and_leaves_a_process_that_has_it_open_the_old_one() {
        let dir = scratch_dir("link-up");
        let (built, installed) = (dir.join("deps-libplugin.so"), dir.join("libplugin.so"));
        std::fs::write(&installed, b"the old build").unwrap();
        // As a loaded library's mapping would: an open file that must keep its content.
        let mut open = std::fs::File::open(&installed).unwrap();
        std::fs::write(&built, b"the new build").unwrap();

        link_up(&built, &installed);
        assert_eq!(std::fs::read(&installed).unwrap(), b"the new build");
        let mut seen = Vec::new();
        open.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, b"the old build", "the old file was written over, not replaced");
        // Linked, not copied: no second copy of a library of tens of megabytes.
        assert_eq!(std::fs::metadata(&installed).unwrap().ino(), std::fs::metadata(&built).unwrap().ino());
        // Linking again (the next run, nothing rebuilt) leaves nothing beside it.
        link_up(&built, &installed);
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["deps-libplugin.so", "libplugin.so"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_builds_a_test_starts_drop_the_tests_package_variables_and_keep_the_users_settings() {
        // What `cargo test` sets for the test process, which build scripts watch.
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_EXE_comms",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_for_the_test(name), "{name} is the test's, not the user's");
        }
        // What the user (or CI) set for every build: a nested cargo must see the same.
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "CARGO_BUILD_JOBS",
            "CARGO_TERM_COLOR",
            "CARGO_NET_OFFLINE",
            "CARGO_PROFILE_DEV_DEBUG",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!set_by_cargo_for_the_test(name), "{name} is the user's setting and must be kept");
        }
    }
}
