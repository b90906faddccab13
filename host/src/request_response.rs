//! Request / response options: the retry policy and how replicas are chosen.
//!
//! Each attempt of a request is a new envelope with a new id, sent to one replica; the response
//! carries that id as its correlation id. A response that arrives after its attempt timed out
//! finds no waiting caller and is dropped: it can never be taken for the answer to a later
//! request or a later attempt (the node engine's table of pending requests decides).

use serde::Deserialize;
use std::time::Duration;

/// How a request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOptions {
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// Attempts in total (at least 1). A later attempt goes to another replica when there is one.
    pub attempts: u32,
    /// Pause before the second attempt; doubles for each further one.
    pub backoff: Duration,
}

impl Default for RequestOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(5), attempts: 3, backoff: Duration::from_millis(50) }
    }
}

/// How requests to a service are spread over its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancing {
    /// Each request to the next replica in turn.
    RoundRobin,
    /// The replica with the fewest requests in flight from this node (ties: in turn).
    #[default]
    LeastOutstanding,
}
