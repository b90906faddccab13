//! Command-line interface of `comms`.

mod check;
mod demo;
mod keygen;
mod new_plugin;
mod node_commands;
mod patterns;
mod plugins;
mod status;
mod top;

use clap::{Parser, Subcommand};
use comms_host::BuildError;
use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, Parser)]
#[command(
    name = "comms",
    version,
    about = "comms: transport-agnostic messaging with run-time loaded plugins"
)]
pub(crate) struct Cli {
    /// Print the long form of errors (e.g. the full plugin layout report).
    #[arg(long, short, global = true)]
    pub(crate) verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Plugin libraries: list what is found, inspect one file, start a new plugin crate.
    #[command(subcommand, alias = "plugin")]
    Plugins(PluginsCommand),
    /// Run a node until Ctrl-C, printing what it receives (a JSON payload as JSON, on one line).
    Run {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Send every received message back to its sender.
        #[arg(long)]
        echo: bool,
    },
    /// Send one text message to a node, then leave.
    Send {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The destination node id.
        #[arg(long)]
        to: String,
        /// The text to send.
        text: String,
        /// How long to wait for the destination to be known (discovered or heard from) before
        /// failing, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// Print received messages, one per line (a JSON payload as JSON, text as text).
    Recv {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// List the peers this node learns of (via discovery and heartbeats), with liveness.
    Peers {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// How long to listen for heartbeats before printing, in milliseconds.
        #[arg(long, default_value_t = 2500)]
        wait_ms: u64,
    },
    /// Ask a node for its status over comms (transports and their counts, peers, services,
    /// queues) and print it.
    Status {
        /// The config file of the node to ask from (any node that can reach NODE).
        #[arg(long, short)]
        config: PathBuf,
        /// The node to ask.
        node: String,
        /// How long to wait for NODE to be known, and then for its answer, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live table of the cluster as this node sees it: every node that is up, with msg/s in
    /// and out, queues, errors and peers, refreshed every interval.
    Top {
        /// The config file of the node to watch from.
        #[arg(long, short)]
        config: PathBuf,
        /// Time between frames, in milliseconds (at least 100).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many frames (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Ask a node to shut down gracefully (it must list this node's key in `[admin] keys`).
    Shutdown {
        /// The config file of the node to ask from: its `node.key_file` is the admin's key, and it
        /// needs `security.signatures = "require"` or "sign".
        #[arg(long, short)]
        config: PathBuf,
        /// The node to shut down.
        node: String,
        /// How long to wait for NODE to be known, and then for its answer, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// Ask a node to read its config file again and apply it (the node must list this node's
    /// key in its `[admin] keys`); prints what changed. `kill -HUP` does the same to a local
    /// `comms run`.
    Reload {
        /// The config file of the node to ask from: its `node.key_file` is the admin's key, and it
        /// needs `security.signatures = "require"` or "sign".
        #[arg(long, short)]
        config: PathBuf,
        /// The node to reload.
        node: String,
        /// How long to wait for NODE to be known, and then for its answer, in milliseconds (a
        /// transport swap waits for the old one to drain).
        #[arg(long, default_value_t = 30000)]
        wait_ms: u64,
    },
    /// Publish one text message on a topic.
    Publish {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The topic, e.g. `orders.eu.created`.
        topic: String,
        /// The text to publish.
        text: String,
        /// How long to wait for a subscriber to be known before publishing to nobody, in
        /// milliseconds (subscribers behind a broker with native topics are not waited for).
        #[arg(long, default_value_t = 2000)]
        wait_ms: u64,
    },
    /// Print text messages published on topics matching a pattern, one per line.
    Subscribe {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The pattern: `*` matches one segment, `>` the rest.
        pattern: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Call a service with a text request and print the text response.
    Request {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The service.
        service: String,
        /// The request text.
        text: String,
        /// Time per attempt, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Attempts (each on another replica when there is one).
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// How long to wait for a replica of the service to be known before failing, in
        /// milliseconds.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// Serve a trivial echo service (answers every request with its own text) until Ctrl-C.
    EchoService {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The service name.
        #[arg(long, default_value = "echo")]
        service: String,
    },
    /// Run the conformance suite against a transport plugin file (or list its cases).
    Check {
        /// The plugin library file.
        #[arg(required_unless_present = "list")]
        file: Option<PathBuf>,
        /// Print every case (name, what it checks, the capability that turns it on) as a
        /// Markdown table, and run nothing.
        #[arg(long, conflicts_with_all = ["config", "key_file", "assume"])]
        list: bool,
        /// Run the cases of these capabilities too, as if the plugin declared them (comma
        /// separated: ordered, acknowledgements, durable, native-topics, reliable, encrypted,
        /// batched-send).
        #[arg(long, value_delimiter = ',')]
        assume: Vec<String>,
        /// A TOML file with the plugin's config table (as under [transports.NAME]); a `layers`
        /// key in it stacks layers over every instance, so the suite checks the stack.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run the suite over encrypted (Noise) links, every node using this key file (from
        /// `comms keygen`); the plugin must then declare that it encrypts its links.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Create a node identity (Ed25519 key file, owner-only) or a network key; prints the public
    /// key and the node id bound to it, never the secret. Refuses to overwrite a file.
    Keygen {
        /// The file to write (default: comms.key, or network.key with --network).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Write a shared network key instead of a node identity.
        #[arg(long, conflicts_with = "show")]
        network: bool,
        /// Print the public key and node id of this existing key file instead.
        #[arg(long, conflicts_with = "out")]
        show: Option<PathBuf>,
        /// The label of the node id to print (`<label>-<public key>`), as `[node] id`.
        #[arg(long)]
        label: Option<String>,
    },
    /// Two nodes exchanging messages over the TCP plugin on loopback; no setup needed.
    Demo {
        /// Directory holding libcomms_tcp.so (default: the plugin search path).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Messages each way.
        #[arg(long, default_value_t = 3)]
        messages: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// List the plugin files found (and whether each loads).
    List {
        /// Directory to scan (repeatable); default: the plugin search path.
        #[arg(long)]
        dir: Vec<PathBuf>,
    },
    /// Load one file and describe it; exits non-zero if it cannot be loaded.
    Inspect {
        /// The plugin library file.
        file: PathBuf,
    },
    /// Create a plugin crate `comms-NAME` (its own cargo workspace, a cdylib) holding a small
    /// transport that passes `comms check` as generated. Never overwrites anything.
    New {
        /// The plugin's name: lowercase letters, digits, `-` and `_`, starting with a letter.
        name: String,
        /// The directory to create (default: ./comms-NAME); must not exist.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The comms-plugin-api crate to depend on (default: the plugin-api/ of the comms
        /// checkout this binary was built from).
        #[arg(long)]
        plugin_api: Option<PathBuf>,
    },
}

/// An error for the user: one line, with an optional long form for `--verbose`.
#[derive(Debug)]
pub(crate) enum CliError {
    Build(BuildError),
    Load(comms_plugin_api::host_side::LoadError),
    Other(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Build(error) => write!(f, "{error}"),
            CliError::Load(error) => write!(f, "{error}"),
            CliError::Other(message) => f.write_str(message),
        }
    }
}

impl CliError {
    pub(crate) fn details(&self) -> Option<&str> {
        match self {
            CliError::Build(BuildError::Load { source, .. }) => source.details(),
            CliError::Load(source) => source.details(),
            _ => None,
        }
    }
}

impl From<BuildError> for CliError {
    fn from(error: BuildError) -> Self {
        CliError::Build(error)
    }
}

impl<E: std::fmt::Display> From<Box<E>> for CliError {
    fn from(error: Box<E>) -> Self {
        CliError::Other(error.to_string())
    }
}

pub(crate) fn other(error: impl std::fmt::Display) -> CliError {
    CliError::Other(error.to_string())
}

pub(crate) async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Plugins(PluginsCommand::List { dir }) => plugins::list(&dir),
        Command::Plugins(PluginsCommand::Inspect { file }) => plugins::inspect(&file),
        Command::Plugins(PluginsCommand::New { name, dir, plugin_api }) => {
            new_plugin::run(&name, dir.as_deref(), plugin_api.as_deref())
        }
        Command::Run { config, echo } => node_commands::run(&config, echo).await,
        Command::Send { config, to, text, wait_ms } => {
            node_commands::send(&config, &to, &text, wait_ms).await
        }
        Command::Recv { config, count } => node_commands::recv(&config, count).await,
        Command::Demo { plugin_dir, messages } => demo::run(plugin_dir, messages).await,
        Command::Peers { config, wait_ms } => patterns::peers(&config, wait_ms).await,
        Command::Status { config, node, wait_ms, json } => status::run(&config, &node, wait_ms, json).await,
        Command::Top { config, interval_ms, count } => top::run(&config, interval_ms, count).await,
        Command::Shutdown { config, node, wait_ms } => status::shutdown(&config, &node, wait_ms).await,
        Command::Reload { config, node, wait_ms } => status::reload(&config, &node, wait_ms).await,
        Command::Publish { config, topic, text, wait_ms } => {
            patterns::publish(&config, &topic, &text, wait_ms).await
        }
        Command::Subscribe { config, pattern, count } => patterns::subscribe(&config, &pattern, count).await,
        Command::Request { config, service, text, timeout_ms, attempts, wait_ms } => {
            patterns::request(&config, &service, &text, timeout_ms, attempts, wait_ms).await
        }
        Command::EchoService { config, service } => patterns::echo_service(&config, &service).await,
        Command::Check { file, list, assume, config, key_file } => match file {
            Some(file) if !list => check::run(&file, config.as_deref(), key_file.as_deref(), &assume).await,
            _ => Ok(check::list()),
        },
        Command::Keygen { out, network, show, label } => match show {
            Some(file) => keygen::show(&file, label.as_deref()),
            None => keygen::generate(out.as_deref(), network, label.as_deref()),
        },
    }
}
