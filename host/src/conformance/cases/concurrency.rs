//! Many instances at once: senders converging on one receiver, receivers fed by a few senders,
//! and per-sender order.

use crate::conformance::harness::{
    describe_missing, envelope, failed, read_tag, tag_payload, while_sending, within, CaseError, CaseResult,
    Endpoint, Harness, Inbox, Settling,
};
use comms_plugin_api::{Capabilities, Destination, Outbound};
use futures::future::{join_all, try_join_all};
use std::sync::Arc;
use tokio::time::Instant;

const CONVERGING_SENDERS: u32 = 20;
const CONVERGING_MESSAGES: u32 = 500;

const ORDERED_SENDERS: u32 = 5;
const ORDERED_MESSAGES: u32 = 400;

const RECEIVERS: u32 = 50;
const MESSAGES_PER_RECEIVER: u32 = 100;
/// Senders feeding the receivers; each sends `MESSAGES_PER_RECEIVER / FEEDING_SENDERS` to each.
const FEEDING_SENDERS: u32 = 5;

/// `batches_and_sends_at_once`: tasks sharing one sender, and what each sends in turn: a batch
/// of this many items (the largest is what a host hands over at once), then one single send.
const GATHERING_TASKS: u32 = 4;
const GATHERED_BATCHES: [u32; 5] = [1024, 1, 255, 7, 512];

/// Has each sender send `messages` tagged `[sender, sequence]` to `receiver`, one after the other.
async fn send_tagged(senders: &[Arc<Endpoint>], receiver: &Endpoint, messages: u32) -> CaseResult {
    try_join_all(senders.iter().enumerate().map(|(s, sender)| async move {
        for sequence in 0..messages {
            let payload = tag_payload(&[s as u32, sequence]);
            sender
                .send_to(receiver, envelope(sender, Destination::Node(receiver.node.clone()), payload))
                .await?;
        }
        Ok::<_, CaseError>(())
    }))
    .await
    .map(drop)
}

/// What arrived from a set of senders: which sequence numbers per sender, and anything odd.
struct Tally {
    seen: Vec<Vec<bool>>,
    distinct: usize,
    duplicates: usize,
    strangers: usize,
    /// The first `(sender, earlier, later)` where `later` arrived before `earlier`.
    out_of_order: Option<(u32, u32, u32)>,
    last: Vec<Option<u32>>,
}

impl Tally {
    fn new(senders: u32, messages: u32) -> Self {
        Self {
            seen: vec![vec![false; messages as usize]; senders as usize],
            distinct: 0,
            duplicates: 0,
            strangers: 0,
            out_of_order: None,
            last: vec![None; senders as usize],
        }
    }

    fn expected(&self) -> usize {
        self.seen.iter().map(Vec::len).sum()
    }

    fn add(&mut self, sender: u32, sequence: u32) {
        let Some(seen) = self.seen.get_mut(sender as usize).and_then(|s| s.get_mut(sequence as usize)) else {
            self.strangers += 1;
            return;
        };
        if std::mem::replace(seen, true) {
            self.duplicates += 1;
        } else {
            self.distinct += 1;
        }
        let last = &mut self.last[sender as usize];
        if let Some(previous) = *last {
            if sequence <= previous && self.out_of_order.is_none() {
                self.out_of_order = Some((sender, sequence, previous));
            }
        }
        *last = Some(sequence);
    }

    /// Receives `[sender, sequence]` messages until all arrived or `deadline`.
    async fn receive(mut self, inbox: &mut Inbox, deadline: Instant) -> Result<Self, CaseError> {
        while self.distinct < self.expected() {
            let Some(inbound) = inbox.next_before(deadline).await? else { break };
            match read_tag::<2>(&inbound.envelope.payload) {
                Some([sender, sequence]) => self.add(sender, sequence),
                None => self.strangers += 1,
            }
        }
        Ok(self)
    }

    /// Fails unless every message arrived exactly once and nothing else did.
    fn verdict(&self, receiver: &str, all_sends_returned: bool) -> CaseResult {
        if self.distinct < self.expected() {
            let per_sender: Vec<String> = self
                .seen
                .iter()
                .enumerate()
                .filter_map(|(s, seen)| {
                    let missing: Vec<u32> = (0..seen.len() as u32).filter(|&i| !seen[i as usize]).collect();
                    (!missing.is_empty())
                        .then(|| format!("sender {s}: {}", describe_missing(seen.len(), &missing)))
                })
                .collect();
            let shown = per_sender.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
            let more = per_sender.len().saturating_sub(3);
            return Err(failed(format!(
                "{receiver} got {} of {} messages; {} senders lost messages: {shown}{}{}",
                self.distinct,
                self.expected(),
                per_sender.len(),
                if more > 0 { format!("; and {more} more senders") } else { String::new() },
                if all_sends_returned { "" } else { " (some sends had not returned yet)" },
            )));
        }
        if self.duplicates > 0 {
            return Err(failed(format!("{receiver} got {} messages twice", self.duplicates)));
        }
        if self.strangers > 0 {
            return Err(failed(format!(
                "{receiver} got {} messages that no sender of this case sent",
                self.strangers
            )));
        }
        Ok(())
    }
}

pub(super) async fn concurrent_senders(h: &Harness) -> CaseResult {
    let receiver = h.open("the receiver").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let senders = h.open_many("sender", CONVERGING_SENDERS as usize).await?;
    let tally = Tally::new(CONVERGING_SENDERS, CONVERGING_MESSAGES);
    let (tally, all_sent) = while_sending(
        send_tagged(&senders, &receiver, CONVERGING_MESSAGES),
        tally.receive(&mut inbox, h.deadline()),
    )
    .await?;
    tally.verdict("the receiver", all_sent)
}

pub(super) async fn order_per_sender(h: &Harness) -> CaseResult {
    let receiver = h.open("the receiver").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let senders = h.open_many("sender", ORDERED_SENDERS as usize).await?;
    let tally = Tally::new(ORDERED_SENDERS, ORDERED_MESSAGES);
    let (tally, all_sent) = while_sending(
        send_tagged(&senders, &receiver, ORDERED_MESSAGES),
        tally.receive(&mut inbox, h.deadline()),
    )
    .await?;
    if let Some((sender, later, earlier)) = tally.out_of_order {
        return Err(failed(format!(
            "sender {sender}'s message {later} arrived after its message {earlier} (the transport declares \
             ordered)"
        )));
    }
    tally.verdict("the receiver", all_sent)
}

pub(super) async fn batches_and_sends_at_once(h: &Harness) -> CaseResult {
    let receiver = h.open("the receiver").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let sender = h.open("the sender").await?;
    let per_task = GATHERED_BATCHES.iter().map(|batch| batch + 1).sum::<u32>();
    let tally = Tally::new(GATHERING_TASKS, per_task);
    let (sender, receiver) = (&sender, &receiver);
    let tagged = move |task: u32, sequence: u32| {
        envelope(sender, Destination::Node(receiver.node.clone()), tag_payload(&[task, sequence]))
    };
    let sending = try_join_all((0..GATHERING_TASKS).map(|task| async move {
        let mut sequence = 0;
        for size in GATHERED_BATCHES {
            let batch: Vec<Outbound> = (sequence..sequence + size)
                .map(|n| Outbound { address: receiver.address().into(), envelope: tagged(task, n) })
                .collect();
            sequence += size;
            let what = format!("task {task}'s send_batch of {size} items");
            let failures = within(&what, h.operation_limit(), sender.transport().send_batch(batch)).await?;
            if let Some(failure) = failures.first() {
                return Err(failed(format!("{what}: item {} failed: {}", failure.index, failure.error)));
            }
            sender.send_to(receiver, tagged(task, sequence)).await?;
            sequence += 1;
        }
        Ok::<_, CaseError>(())
    }));
    let sending = async { sending.await.map(drop) };
    let (tally, all_sent) = while_sending(sending, tally.receive(&mut inbox, h.deadline())).await?;
    let ordered = h.capabilities().contains(Capabilities::ORDERED);
    if let Some((task, later, earlier)) = tally.out_of_order.filter(|_| ordered) {
        return Err(failed(format!(
            "task {task}'s message {later} arrived after its message {earlier}: one task's batches and \
             sends, each awaited before the next, must keep their order (the transport declares ordered)"
        )));
    }
    tally.verdict("the receiver", all_sent)
}

pub(super) async fn concurrent_receivers(h: &Harness) -> CaseResult {
    let receivers = h.open_many("receiver", RECEIVERS as usize).await?;
    let mut inboxes: Vec<Inbox> = receivers.iter().map(|r| h.inbox(r, Settling::AcceptAll)).collect();
    let senders = h.open_many("sender", FEEDING_SENDERS as usize).await?;
    let rounds = MESSAGES_PER_RECEIVER / FEEDING_SENDERS;

    // Each sender goes round the receivers `rounds` times: message `round` to every receiver.
    let sending = try_join_all(senders.iter().enumerate().map(|(s, sender)| {
        let receivers = &receivers;
        async move {
            for round in 0..rounds {
                for (r, receiver) in receivers.iter().enumerate() {
                    let payload = tag_payload(&[r as u32, s as u32, round]);
                    sender
                        .send_to(
                            receiver,
                            envelope(sender, Destination::Node(receiver.node.clone()), payload),
                        )
                        .await?;
                }
            }
            Ok::<_, CaseError>(())
        }
    }));
    let sending = async { sending.await.map(drop) };

    let deadline = h.deadline();
    let receiving =
        join_all(inboxes.iter_mut().zip(&receivers).enumerate().map(|(r, (inbox, receiver))| async move {
            let mut tally = Tally::new(FEEDING_SENDERS, rounds);
            let mut misdelivered = 0usize;
            while tally.distinct < tally.expected() {
                let Some(inbound) = inbox.next_before(deadline).await? else { break };
                let to_me = inbound.envelope.to == Destination::Node(receiver.node.clone());
                match read_tag::<3>(&inbound.envelope.payload) {
                    Some([to, sender, round]) if to == r as u32 && to_me => tally.add(sender, round),
                    _ => misdelivered += 1,
                }
            }
            Ok::<_, CaseError>((tally, misdelivered))
        }));
    let receiving = async { receiving.await.into_iter().collect::<Result<Vec<_>, _>>() };
    let (tallies, all_sent) = while_sending(sending, receiving).await?;

    let misdelivered: usize = tallies.iter().map(|(_, m)| m).sum();
    if misdelivered > 0 {
        return Err(failed(format!("{misdelivered} messages reached a receiver they were not sent to")));
    }
    let short: Vec<usize> =
        (0..tallies.len()).filter(|&r| tallies[r].0.distinct < tallies[r].0.expected()).collect();
    if let Some(&first) = short.first() {
        let total: usize = tallies.iter().map(|(t, _)| t.distinct).sum();
        let detail = tallies[first].0.verdict(&format!("receiver {first}"), all_sent).err();
        let detail = match detail {
            Some(CaseError::Failed(reason) | CaseError::Skipped(reason)) => reason,
            None => String::new(),
        };
        return Err(failed(format!(
            "{total} of {} messages arrived; {} receivers are missing messages, first: {detail}",
            RECEIVERS * MESSAGES_PER_RECEIVER,
            short.len()
        )));
    }
    for (r, (tally, _)) in tallies.iter().enumerate() {
        tally.verdict(&format!("receiver {r}"), all_sent)?;
    }
    Ok(())
}
