//! The database thread of one transport: rusqlite is synchronous, so every query of a transport
//! runs on a thread of its own, fed through a bounded channel, and never on an async worker.
//!
//! The thread takes whatever commands are waiting (up to `batch_size`) and writes all the sends,
//! settlements and subscription changes among them in one transaction: one commit for many
//! messages (group commit), which is where the throughput comes from. If that transaction fails,
//! each command is tried again in a transaction of its own, so that one bad command cannot fail
//! the others.

use crate::{
    mailbox::{Claimed, Outgoing, SqliteMailbox, SubscriptionChange},
    schema::db_error,
    wake,
};
use comms_plugin_api::{PluginError, Settlement};
use tokio::sync::{mpsc, oneshot};

type Reply<T> = oneshot::Sender<Result<T, PluginError>>;

/// What the async side asks the database thread to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// Write one message (or, for a topic, one row per subscriber).
    Send { outgoing: Outgoing, reply: Reply<()> },
    /// Apply settlements.
    Settle { settlements: Vec<Settlement>, reply: Reply<()> },
    /// Add or remove a subscription of this node.
    Subscription { change: SubscriptionChange, reply: Reply<()> },
    /// Claim up to `max` messages (see [`SqliteMailbox::claim`]).
    Claim { max: usize, unless_version: Option<i64>, reply: Reply<Claimed> },
    /// Release this instance's leases and stop.
    Close { reply: Reply<()> },
}

/// Starts the database thread for `mailbox`; `wake_path` is the canonical database path used to
/// wake receivers in this process.
pub(crate) fn spawn(
    mailbox: SqliteMailbox,
    wake_path: String,
    commands: mpsc::Receiver<Command>,
) -> Result<(), PluginError> {
    std::thread::Builder::new()
        .name("comms-sqlite-db".into())
        .spawn(move || run(mailbox, wake_path, commands))
        .map(drop)
        .map_err(PluginError::from)
}

fn run(mut mailbox: SqliteMailbox, wake_path: String, mut commands: mpsc::Receiver<Command>) {
    let group_limit = mailbox.config().batch_size.max(1);
    while let Some(first) = commands.blocking_recv() {
        let mut writes = Vec::new();
        let mut claims = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(command) = next.take() {
            taken += 1;
            match command {
                Command::Claim { max, unless_version, reply } => claims.push((max, unless_version, reply)),
                Command::Close { reply } => close = Some(reply),
                write => writes.push(write),
            }
            if taken < group_limit && close.is_none() {
                next = commands.try_recv().ok();
            }
        }
        apply_writes(&mut mailbox, &wake_path, writes);
        for (max, unless_version, reply) in claims {
            let claimed = mailbox
                .claim(max, unless_version)
                .map_err(|error| db_error("claiming messages", mailbox.config(), error));
            if let Err(Ok(unwanted)) = reply.send(claimed) {
                // The receive was cancelled while the claim ran: hand the rows back at once.
                release_unwanted(&mut mailbox, &wake_path, unwanted);
            }
        }
        if let Some(reply) = close {
            let released = release(&mut mailbox);
            // Close the connection before answering: once `close` returns, the files may be
            // deleted, and SQLite must not touch them (checkpoint, unlink the WAL) afterwards.
            drop(mailbox);
            let _ = reply.send(released);
            return;
        }
    }
    // Every sender is gone (the transport was dropped without close).
    let _ = release(&mut mailbox);
}

fn release(mailbox: &mut SqliteMailbox) -> Result<(), PluginError> {
    mailbox
        .release_leases()
        .map(drop)
        .map_err(|error| db_error("releasing the leases of unsettled messages", mailbox.config(), error))
}

fn release_unwanted(mailbox: &mut SqliteMailbox, wake_path: &str, claimed: Claimed) {
    if claimed.messages.is_empty() {
        return;
    }
    let requeue: Vec<Settlement> = claimed
        .messages
        .iter()
        .map(|inbound| Settlement {
            delivery_tag: inbound.delivery_tag,
            outcome: comms_plugin_api::SettlementOutcome::REJECTED_REQUEUE,
        })
        .collect();
    match mailbox.write(&[], &requeue, &[]) {
        Ok(_) => wake::wake(wake_path, [mailbox.recipient()]),
        Err(error) => {
            tracing::debug!(%error, "releasing messages of a cancelled receive failed; the lease expires")
        }
    }
}

/// Applies the write commands in one transaction, or one by one if that fails.
fn apply_writes(mailbox: &mut SqliteMailbox, wake_path: &str, writes: Vec<Command>) {
    if writes.is_empty() {
        return;
    }
    let result = write_all(mailbox, &writes);
    match result {
        Ok(recipients) => {
            wake_receivers(mailbox, wake_path, &recipients);
            for command in writes {
                reply(command, Ok(()));
            }
        }
        Err(error) if writes.len() == 1 => {
            let error = db_error(what(&writes[0]), mailbox.config(), error);
            for command in writes {
                reply(command, Err(error.clone()));
            }
        }
        Err(_) => {
            for command in writes {
                let result = write_all(mailbox, std::slice::from_ref(&command));
                match result {
                    Ok(recipients) => {
                        wake_receivers(mailbox, wake_path, &recipients);
                        reply(command, Ok(()));
                    }
                    Err(error) => {
                        let error = db_error(what(&command), mailbox.config(), error);
                        reply(command, Err(error));
                    }
                }
            }
        }
    }
}

/// Wakes the receivers in this process of the nodes that got messages (only this node's own,
/// without `in_process_wakeup`: its own commits are invisible to `PRAGMA data_version`).
fn wake_receivers(mailbox: &SqliteMailbox, wake_path: &str, recipients: &std::collections::BTreeSet<String>) {
    if mailbox.config().in_process_wakeup {
        wake::wake(wake_path, recipients.iter().map(String::as_str));
    } else if recipients.contains(mailbox.recipient()) {
        wake::wake(wake_path, [mailbox.recipient()]);
    }
}

fn what(command: &Command) -> &'static str {
    match command {
        Command::Send { .. } => "writing a message",
        Command::Settle { .. } => "settling messages",
        Command::Subscription { .. } => "changing a subscription",
        Command::Claim { .. } => "claiming messages",
        Command::Close { .. } => "closing",
    }
}

fn write_all(
    mailbox: &mut SqliteMailbox,
    writes: &[Command],
) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut outgoing = Vec::new();
    let mut settlements = Vec::new();
    let mut subscriptions = Vec::new();
    for command in writes {
        match command {
            Command::Send { outgoing: message, .. } => outgoing.push(message),
            Command::Settle { settlements: list, .. } => settlements.extend_from_slice(list),
            Command::Subscription { change, .. } => subscriptions.push(change),
            Command::Claim { .. } | Command::Close { .. } => {}
        }
    }
    mailbox.write(&outgoing, &settlements, &subscriptions)
}

fn reply(command: Command, result: Result<(), PluginError>) {
    match command {
        Command::Send { reply, .. } | Command::Settle { reply, .. } | Command::Subscription { reply, .. } => {
            let _ = reply.send(result);
        }
        Command::Claim { .. } | Command::Close { .. } => {}
    }
}
