//! Handing received messages to the host in batches: the receive loop every backend needs.

use tokio::sync::{mpsc, watch};

/// Waits for at least one item from `queue` and returns it with up to `max_batch - 1` more that
/// are already waiting. Returns an empty batch once `queue` is closed and drained, or once
/// `closing` turns `true` with nothing buffered (buffered items are handed over first).
///
/// This is [`crate::Transport::receive`] for a backend whose background tasks feed a bounded
/// channel. Cancel-safe: nothing is taken from the queue unless it is returned.
pub async fn receive_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    max_batch: usize,
    closing: &mut watch::Receiver<bool>,
) -> Vec<T> {
    let first = tokio::select! {
        biased;
        first = queue.recv() => first,
        _ = closing.wait_for(|closing| *closing) => queue.try_recv().ok(),
    };
    let Some(first) = first else { return Vec::new() };
    let mut batch = Vec::with_capacity(max_batch.clamp(1, 256));
    batch.push(first);
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_what_is_waiting_and_ends_when_closing() {
        let (sender, mut queue) = mpsc::channel(16);
        let (closing_tx, mut closing) = watch::channel(false);
        for i in 0..5 {
            sender.send(i).await.unwrap();
        }
        assert_eq!(receive_batch(&mut queue, 3, &mut closing).await, vec![0, 1, 2]);
        closing_tx.send_replace(true);
        assert_eq!(receive_batch(&mut queue, 10, &mut closing).await, vec![3, 4], "buffered first");
        assert!(receive_batch(&mut queue, 10, &mut closing).await.is_empty());
        drop(sender);
        let (_, mut open) = watch::channel(false);
        assert!(receive_batch(&mut queue, 10, &mut open).await.is_empty(), "a closed queue ends");
    }
}
