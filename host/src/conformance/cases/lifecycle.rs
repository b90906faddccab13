//! Creating and closing instances.

use crate::conformance::harness::{
    ensure, envelope, failed, read_tag, tag_payload, within, CaseResult, Endpoint, Harness, Settling,
};
use comms_plugin_api::{Capabilities, Destination, ErrorCode, PluginError};
use futures::future::join_all;
use std::{sync::Arc, time::Duration};

/// Messages sent to the receiver that `close` closes mid-stream.
const CLOSE_MID_STREAM_MESSAGES: u32 = 20;

/// Instances opened and closed at once.
const AT_ONCE: usize = 10;

/// Turns the result of a close into the case's verdict.
fn closed_ok(endpoint: &Endpoint, result: Result<(), PluginError>) -> CaseResult {
    result.map_err(|error| failed(format!("closing {} failed: {error}", endpoint.role)))
}

pub(super) async fn create_transport(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let first = h.open("the first instance").await?;
    let info = first.info().clone();
    h.record_info(info.clone());
    ensure!(
        !info.local_address.is_empty(),
        "the transport reports an empty local_address: nobody could reach it"
    );
    ensure!(info.max_message_size > 0, "the transport reports a max_message_size of 0 bytes");
    ensure!(
        !h.noise_links() || info.capabilities.contains(Capabilities::ENCRYPTED),
        "the suite runs with encrypted links, but the transport does not declare the capability \
         `encrypted`: it ignored the link security it was given (a node with [security] links = \"noise\" \
         refuses such a transport)"
    );

    let second = h.open("a second instance").await?;
    ensure!(
        second.address() != first.address(),
        "two instances with the same config report the same local address {}: instances must work side by \
         side (for example listen on port 0, or derive the address from the node id)",
        first.address()
    );
    ensure!(
        second.info().capabilities == info.capabilities
            && second.info().max_message_size == info.max_message_size,
        "two instances with the same config declare different capabilities or limits: {:?} and {:?}",
        info,
        second.info()
    );
    for endpoint in [&first, &second] {
        closed_ok(endpoint, within(&format!("closing {}", endpoint.role), limit, endpoint.close()).await?)?;
    }
    Ok(())
}

pub(super) async fn close(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let to_receiver = || Destination::Node(receiver.node.clone());
    for i in 0..CLOSE_MID_STREAM_MESSAGES {
        sender.send_to(&receiver, envelope(&sender, to_receiver(), tag_payload(&[i]))).await?;
    }

    // Take one message, so that the stream is flowing, and close with the rest on their way.
    let first = within("the first receive", limit, receiver.transport().receive(1))
        .await?
        .map_err(|error| failed(format!("receive failed: {error}")))?;
    ensure!(!first.is_empty(), "receive returned an empty batch (closed) although the transport was open");
    ensure!(first.len() == 1, "receive(1) returned {} messages; max_batch is a maximum", first.len());
    closed_ok(&receiver, within("closing the receiver", limit, receiver.close()).await?)?;

    // What was already received may still be handed out; then an empty batch, and again.
    let mut drained = first.len();
    loop {
        let batch = within("a receive after close", limit, receiver.transport().receive(256))
            .await?
            .map_err(|error| {
                failed(format!("receive after close failed ({error}); it must return an empty batch"))
            })?;
        if batch.is_empty() {
            break;
        }
        drained += batch.len();
        ensure!(
            drained <= CLOSE_MID_STREAM_MESSAGES as usize,
            "receive after close keeps returning messages ({drained} so far, {CLOSE_MID_STREAM_MESSAGES} were sent)"
        );
    }
    let again = within("a second receive after the empty batch", limit, receiver.transport().receive(256))
        .await?
        .map_err(|error| failed(format!("receive after the empty batch failed: {error}")))?;
    ensure!(
        again.is_empty(),
        "receive returned {} messages after it had returned an empty batch",
        again.len()
    );

    let late = envelope(&receiver, Destination::Node(sender.node.clone()), b"after close".to_vec());
    match within("a send after close", limit, receiver.send(sender.address(), late)).await? {
        Ok(()) => return Err(failed("a send after close succeeded; it must fail with code CLOSED")),
        Err(error) if error.code == ErrorCode::CLOSED => {}
        Err(error) => {
            return Err(failed(format!(
                "a send after close failed with code `{}` ({error}); expected `{}`",
                error.code.name(),
                ErrorCode::CLOSED.name()
            )))
        }
    }
    match within("a second close", limit, receiver.transport().close()).await? {
        Ok(()) => {}
        Err(error) if error.code == ErrorCode::CLOSED => {}
        Err(error) => {
            return Err(failed(format!("a second close failed: {error}; expected success or CLOSED")))
        }
    }

    // A host's receive loop is usually waiting when the node closes: that receive must end.
    let idle = h.open("an idle instance").await?;
    let waiting = idle.transport().receive(16);
    let closing = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle.close().await
    };
    let (batch, closed) = within(
        "a receive that was waiting while its transport closed",
        limit,
        futures::future::join(waiting, closing),
    )
    .await?;
    closed_ok(&idle, closed)?;
    let batch = batch.map_err(|error| {
        failed(format!(
            "a receive that was waiting while its transport closed failed ({error}); expected an empty batch"
        ))
    })?;
    ensure!(
        batch.is_empty(),
        "a receive waiting during close returned {} messages although none were sent",
        batch.len()
    );
    Ok(())
}

pub(super) async fn concurrent_open_close(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let ring = h.open_many("instance", AT_ONCE).await?;
    let mut inboxes: Vec<_> = ring.iter().map(|endpoint| h.inbox(endpoint, Settling::AcceptAll)).collect();
    // Each instance sends one message to the next one round the ring.
    let sends = join_all(ring.iter().enumerate().map(|(i, from)| {
        let to = &ring[(i + 1) % AT_ONCE];
        from.send_to(to, envelope(from, Destination::Node(to.node.clone()), tag_payload(&[i as u32])))
    }))
    .await;
    sends.into_iter().collect::<CaseResult>()?;
    let deadline = h.deadline();
    for (i, inbox) in inboxes.iter_mut().enumerate() {
        let received = inbox.next_before(deadline).await?;
        let expected = ((i + AT_ONCE - 1) % AT_ONCE) as u32;
        match received.map(|inbound| read_tag::<1>(&inbound.envelope.payload)) {
            Some(Some([from])) if from == expected => {}
            Some(tag) => {
                return Err(failed(format!(
                    "instance {i} received {tag:?}, expected the message of instance {expected}"
                )))
            }
            None => {
                return Err(failed(format!(
                    "the message from instance {expected} to instance {i} did not arrive"
                )))
            }
        }
    }
    close_at_once(&ring, limit).await?;

    // Everything the first ten held (ports, paths, tasks) must be free for the next ten.
    let again = h.open_many("reopened instance", AT_ONCE).await?;
    close_at_once(&again, limit).await
}

async fn close_at_once(endpoints: &[Arc<Endpoint>], limit: Duration) -> CaseResult {
    let what = format!("closing {} instances at once", endpoints.len());
    let results = within(&what, limit, join_all(endpoints.iter().map(|endpoint| endpoint.close()))).await?;
    endpoints.iter().zip(results).try_for_each(|(endpoint, result)| closed_ok(endpoint, result))
}
