//! Native topics: subscribe, publish (send with an empty address), patterns, isolation.

use super::envelope::ensure_intact;
use crate::conformance::harness::{
    ensure, envelope, failed, read_tag, tag_payload, unique_name, while_sending, within, CaseError,
    CaseResult, Endpoint, Harness, Inbox, Settling,
};
use comms_plugin_api::{Destination, Envelope};
use futures::future::{join_all, try_join_all};
use std::collections::BTreeSet;

const FAN_OUT_SUBSCRIBERS: usize = 10;
const FAN_OUT_PUBLISHERS: u32 = 2;
const FAN_OUT_MESSAGES: u32 = 100;

/// A topic prefix no other run or case uses: `conformance.conf-<nonce>-<n>-topics`.
fn fresh_prefix() -> String {
    format!("conformance.{}", unique_name("topics"))
}

async fn subscribe(h: &Harness, endpoint: &Endpoint, pattern: &str) -> CaseResult {
    within(
        &format!("subscribing {} to `{pattern}`", endpoint.role),
        h.operation_limit(),
        endpoint.transport().subscribe(pattern),
    )
    .await?
    .map_err(|error| failed(format!("subscribing {} to `{pattern}` failed: {error}", endpoint.role)))
}

async fn publish(publisher: &Endpoint, message: Envelope) -> CaseResult {
    let topic = message.to.name().to_string();
    publisher.send("", message).await.map_err(|error| {
        failed(format!("publishing to `{topic}` (send with an empty address) failed: {error}"))
    })
}

pub(super) async fn topic_isolation(h: &Harness) -> CaseResult {
    let p = fresh_prefix();
    let publisher = h.open("the publisher").await?;
    let one_segment = h.open("the subscriber of `orders.*`").await?;
    let rest = h.open("the subscriber of `orders.>`").await?;
    let exact = h.open("the subscriber of `billing.eu`").await?;
    let unsubscribed = h.open("the subscriber that unsubscribed").await?;
    let bystander = h.open("an instance with no subscription").await?;

    subscribe(h, &one_segment, &format!("{p}.orders.*")).await?;
    subscribe(h, &rest, &format!("{p}.orders.>")).await?;
    subscribe(h, &exact, &format!("{p}.billing.eu")).await?;
    subscribe(h, &unsubscribed, &format!("{p}.billing.>")).await?;
    let pattern = format!("{p}.billing.>");
    within("unsubscribing", h.operation_limit(), unsubscribed.transport().unsubscribe(&pattern))
        .await?
        .map_err(|error| failed(format!("unsubscribing from `{pattern}` failed: {error}")))?;

    let endpoints = [&one_segment, &rest, &exact, &unsubscribed, &bystander];
    let mut inboxes: Vec<Inbox> = endpoints.iter().map(|e| h.inbox(e, Settling::AcceptAll)).collect();

    let topics = ["orders.eu", "orders.us.east", "billing.eu", "audit"];
    let published: Vec<Envelope> = topics
        .iter()
        .enumerate()
        .map(|(i, topic)| {
            let mut message =
                envelope(&publisher, Destination::topic(format!("{p}.{topic}")), tag_payload(&[i as u32]));
            message.headers.push("topic-header", format!("für {topic}"));
            message
        })
        .collect();
    for message in &published {
        publish(&publisher, message.clone()).await?;
    }

    // Which of the published messages each endpoint must get, by index into `topics`.
    let expected: [&[usize]; 5] = [&[0], &[0, 1], &[2], &[], &[]];
    let deadline = h.deadline();
    for ((inbox, wanted), endpoint) in inboxes.iter_mut().zip(expected).zip(endpoints) {
        let got = inbox.collect(wanted.len(), deadline).await?;
        let got_topics: Vec<String> =
            got.iter().map(|inbound| inbound.envelope.to.name().to_string()).collect();
        ensure!(
            got.len() == wanted.len(),
            "{} got {} of {} messages (topics {got_topics:?})",
            endpoint.role,
            got.len(),
            wanted.len()
        );
        for &i in wanted {
            let sent = &published[i];
            let Some(inbound) = got.iter().find(|inbound| inbound.envelope.id == sent.id) else {
                return Err(failed(format!(
                    "{} did not get the message published to `{}`; it got {got_topics:?}",
                    endpoint.role,
                    sent.to.name()
                )));
            };
            ensure_intact(
                &format!("the message published to `{}`", sent.to.name()),
                sent,
                &inbound.envelope,
            )?;
        }
    }
    // Nothing else, anywhere: not the other topics, not twice.
    let quiet = join_all(
        inboxes
            .iter_mut()
            .map(|inbox| inbox.expect_nothing("no other published topic matches its subscriptions")),
    )
    .await;
    quiet.into_iter().collect()
}

pub(super) async fn topic_fan_out(h: &Harness) -> CaseResult {
    let topic = format!("{}.fan-out", fresh_prefix());
    let subscribers = h.open_many("subscriber", FAN_OUT_SUBSCRIBERS).await?;
    let publishers = h.open_many("publisher", FAN_OUT_PUBLISHERS as usize).await?;
    try_join_all(subscribers.iter().map(|s| subscribe(h, s, &topic))).await?;
    let mut inboxes: Vec<Inbox> = subscribers.iter().map(|s| h.inbox(s, Settling::AcceptAll)).collect();

    let publishing = try_join_all(publishers.iter().enumerate().map(|(p, publisher)| {
        let topic = &topic;
        async move {
            for i in 0..FAN_OUT_MESSAGES {
                let message =
                    envelope(publisher, Destination::topic(topic.clone()), tag_payload(&[p as u32, i]));
                publish(publisher, message).await?;
            }
            Ok::<_, CaseError>(())
        }
    }));
    let wanted = (FAN_OUT_PUBLISHERS * FAN_OUT_MESSAGES) as usize;
    let deadline = h.deadline();
    let receiving = join_all(inboxes.iter_mut().map(|inbox| async move {
        let mut seen = BTreeSet::new();
        while seen.len() < wanted {
            let Some(inbound) = inbox.next_before(deadline).await? else { break };
            let Some(tag) = read_tag::<2>(&inbound.envelope.payload) else {
                return Err(failed(format!("{} got a message nobody published", inbox.role())));
            };
            seen.insert(tag);
        }
        Ok::<_, CaseError>(seen.len())
    }));
    let receiving = async { receiving.await.into_iter().collect::<Result<Vec<usize>, _>>() };
    let (counts, _) = while_sending(async { publishing.await.map(drop) }, receiving).await?;
    for (subscriber, count) in subscribers.iter().zip(counts) {
        ensure!(
            count == wanted,
            "{} got {count} of the {wanted} messages published to `{topic}`",
            subscriber.role
        );
    }
    Ok(())
}
