//! The gathering against a linked plugin that records every call and holds `send` and
//! `send_batch` until the test lets them go.

use super::{GatheredSends, MAX_CALLS, MAX_QUEUED};
use comms_plugin_api::{
    async_trait,
    host_side::{LoadedTransport, PluginLibrary},
    Capabilities, Destination, Envelope, ErrorCode, Inbound, MessageId, NodeId, Outbound, Payload, Plugin,
    PluginError, Provides, SendFailure, Setup, Transport, TransportInfo,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};
use tokio::sync::{watch, Semaphore};

/// A call the recording transport saw: the ids it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Send(u128),
    Batch(Vec<u128>),
}

/// What one test's transport saw, and the gate its calls wait at.
struct Recorder {
    calls: Mutex<Vec<Call>>,
    /// The task each call was made from (the plugin's future is polled by its caller).
    tasks: Mutex<Vec<Option<tokio::task::Id>>>,
    /// How many calls have started.
    started: watch::Sender<usize>,
    gate: Semaphore,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits until `count` calls have started.
    async fn started(&self, count: usize) {
        let mut started = self.started.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), started.wait_for(|n| *n >= count)).await;
        assert!(waited.is_ok(), "{count} calls did not start: {:?}", self.calls());
    }
}

/// The recorders of the tests running in this process, by node id.
fn recorders() -> &'static Mutex<HashMap<String, Arc<Recorder>>> {
    static RECORDERS: OnceLock<Mutex<HashMap<String, Arc<Recorder>>>> = OnceLock::new();
    RECORDERS.get_or_init(Default::default)
}

/// Message id that the recording transport refuses.
const REFUSED: u128 = 13;

struct Recording(Arc<Recorder>);

impl Recording {
    /// Records the call, then waits at the gate (each call takes one permit for good).
    async fn call(&self, call: Call) {
        self.0.calls.lock().unwrap().push(call);
        self.0.tasks.lock().unwrap().push(tokio::task::try_id());
        self.0.started.send_modify(|n| *n += 1);
        self.0.gate.acquire().await.expect("the gate stays open").forget();
    }
}

#[async_trait]
impl Transport for Recording {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(Capabilities::BATCHED_SEND, "here", 1 << 20)
    }
    async fn send(&self, _address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let id = envelope.id.as_u128();
        self.call(Call::Send(id)).await;
        match id {
            REFUSED => Err(PluginError::new(ErrorCode::TOO_LARGE, "refused")),
            _ => Ok(()),
        }
    }
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let ids: Vec<u128> = batch.iter().map(|outbound| outbound.envelope.id.as_u128()).collect();
        self.call(Call::Batch(ids.clone())).await;
        let refused = ids.iter().position(|id| *id == REFUSED);
        let error = PluginError::new(ErrorCode::TOO_LARGE, "refused");
        refused.map(|index| SendFailure { index, error }).into_iter().collect()
    }
    async fn receive(&self, _max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        Ok(Vec::new())
    }
    async fn close(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

struct RecordingPlugin;

#[async_trait]
impl Plugin for RecordingPlugin {
    const NAME: &'static str = "recording";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "records sends";
    const PROVIDES: Provides = Provides::TRANSPORT;
    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let recorder = Arc::clone(&recorders().lock().unwrap()[setup.node_id.as_str()]);
        Ok(Arc::new(Recording(recorder)))
    }
}

/// A gathering over a fresh recording transport for node `test`.
async fn gathering(test: &str) -> (Arc<GatheredSends>, Arc<Recorder>) {
    let recorder = Arc::new(Recorder {
        calls: Mutex::new(Vec::new()),
        tasks: Mutex::new(Vec::new()),
        started: watch::channel(0).0,
        gate: Semaphore::new(0),
    });
    recorders().lock().unwrap().insert(test.to_string(), Arc::clone(&recorder));
    let library = PluginLibrary::linked::<RecordingPlugin>();
    let transport: LoadedTransport =
        library.new_transport(&NodeId::new(test), "recording", "").await.unwrap();
    (GatheredSends::new(Arc::new(transport)), recorder)
}

/// Boxed, as the driver hands envelopes to [`GatheredSends::send`].
fn envelope(n: u128) -> Box<Envelope> {
    Box::new(Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("a"),
        Destination::Node(NodeId::new("b")),
        Payload::from(vec![7]),
    ))
}

fn spawn_send(gathered: &Arc<GatheredSends>, n: u128) -> tokio::task::JoinHandle<Result<(), PluginError>> {
    let gathered = Arc::clone(gathered);
    tokio::spawn(async move { gathered.send("there", envelope(n)).await })
}

#[tokio::test]
async fn a_lone_send_goes_out_at_once_and_alone() {
    let (gathered, recorder) = gathering("lone").await;
    recorder.gate.add_permits(2);
    gathered.send("there", envelope(1)).await.unwrap();
    gathered.send("there", envelope(2)).await.unwrap();
    assert_eq!(recorder.calls(), [Call::Send(1), Call::Send(2)]);
}

/// Starts [`MAX_CALLS`] sends (ids `1..=MAX_CALLS`) one after the other, each once the one
/// before is held in the plugin (sends started at the same moment would go out together).
async fn fill_the_calls(
    gathered: &Arc<GatheredSends>,
    recorder: &Recorder,
) -> Vec<tokio::task::JoinHandle<Result<(), PluginError>>> {
    let mut leads = Vec::new();
    for n in 1..=MAX_CALLS {
        leads.push(spawn_send(gathered, n as u128));
        recorder.started(n).await;
    }
    leads
}

#[tokio::test]
async fn sends_made_at_the_same_moment_go_out_in_one_call_each_with_its_outcome() {
    let (gathered, recorder) = gathering("same moment").await;
    // All spawned before any runs (one thread): the first takes a call and lets the others join.
    let sends: Vec<_> = [1, 2, REFUSED, 4].into_iter().map(|n| spawn_send(&gathered, n)).collect();
    recorder.gate.add_permits(1);
    let outcomes: Vec<_> = futures::future::join_all(sends).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(recorder.calls(), [Call::Batch(vec![1, 2, REFUSED, 4])], "one call for the four");
    for (n, outcome) in [1, 2, REFUSED, 4].into_iter().zip(&outcomes) {
        match n {
            REFUSED => assert_eq!(outcome.as_ref().unwrap_err().code, ErrorCode::TOO_LARGE),
            _ => assert!(outcome.is_ok(), "message {n}: {outcome:?}"),
        }
    }
}

#[tokio::test]
async fn a_lead_that_stops_waiting_does_not_take_back_the_sends_that_joined_its_call() {
    let (gathered, recorder) = gathering("lead stops waiting").await;
    let lead = spawn_send(&gathered, 1);
    let joined = spawn_send(&gathered, 2);
    recorder.started(1).await;
    assert_eq!(recorder.calls(), [Call::Batch(vec![1, 2])]);
    // The lead's caller gives up while the call is held in the plugin.
    lead.abort();
    assert!(lead.await.unwrap_err().is_cancelled());
    recorder.gate.add_permits(1);
    assert!(joined.await.unwrap().is_ok(), "the call went on and answered the send that joined it");
    // The call was given back.
    goes_out_alone(&gathered, &recorder, 3).await;
}

#[tokio::test]
async fn a_lead_makes_the_batched_call_from_its_own_task() {
    let (gathered, recorder) = gathering("lead's own task").await;
    let lead = spawn_send(&gathered, 1);
    let joined = spawn_send(&gathered, 2);
    recorder.started(1).await;
    assert_eq!(recorder.calls(), [Call::Batch(vec![1, 2])]);
    // No task of its own between the sender and the plugin: the batch's answer wakes the task
    // that waits for it (one thread crossing fewer per batch).
    assert_eq!(*recorder.tasks.lock().unwrap(), [Some(lead.id())], "the call was made from the lead's task");
    recorder.gate.add_permits(1);
    assert!(lead.await.unwrap().is_ok() && joined.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_lead_dropped_while_its_call_forms_still_hands_the_joined_sends_over() {
    let (gathered, recorder) = gathering("dropped forming").await;
    let lead = spawn_send(&gathered, 1);
    let joined = spawn_send(&gathered, 2);
    // Both are polled once: the lead yields with the call forming, the second joins it.
    queued(&gathered, 1).await;
    lead.abort();
    assert!(lead.await.unwrap_err().is_cancelled());
    recorder.gate.add_permits(1);
    joined.await.unwrap().unwrap();
    assert_eq!(recorder.calls(), [Call::Send(2)], "the joined send went out, the dropped lead's did not");
    goes_out_alone(&gathered, &recorder, 3).await;
}

/// Checks that the gathering is idle again: message `n` goes out alone, in a call of its own.
async fn goes_out_alone(gathered: &Arc<GatheredSends>, recorder: &Recorder, n: u128) {
    recorder.gate.add_permits(1);
    gathered.send("there", envelope(n)).await.unwrap();
    assert_eq!(recorder.calls().last(), Some(&Call::Send(n)));
}

/// Waits until `count` messages are queued.
async fn queued(gathered: &GatheredSends, count: usize) {
    while super::super::lock(&gathered.state).queue.len() < count {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn sends_that_overlap_busy_calls_go_out_in_one_batch_in_order_each_with_its_outcome() {
    let (gathered, recorder) = gathering("overlap").await;
    let leads = fill_the_calls(&gathered, &recorder).await;
    // These come while every call is held: they wait, in this order.
    let mut waiting = Vec::new();
    for n in [10, 11, 12, REFUSED, 14] {
        waiting.push(spawn_send(&gathered, n));
        queued(&gathered, waiting.len()).await;
    }
    assert_eq!(recorder.calls().len(), MAX_CALLS, "nothing else went out while the calls were held");
    recorder.gate.add_permits(MAX_CALLS + 1);
    for lead in leads {
        lead.await.unwrap().unwrap();
    }
    let outcomes: Vec<_> = futures::future::join_all(waiting).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(recorder.calls()[MAX_CALLS..], [Call::Batch(vec![10, 11, 12, REFUSED, 14])]);
    for (n, outcome) in [10, 11, 12, REFUSED, 14].into_iter().zip(&outcomes) {
        match n {
            REFUSED => assert_eq!(outcome.as_ref().unwrap_err().code, ErrorCode::TOO_LARGE),
            _ => assert!(outcome.is_ok(), "message {n}: {outcome:?}"),
        }
    }
    goes_out_alone(&gathered, &recorder, 20).await;
}

#[tokio::test]
async fn a_full_queue_sends_alone_and_a_dropped_lead_still_hands_the_queue_over() {
    let (gathered, recorder) = gathering("full").await;
    let mut leads = fill_the_calls(&gathered, &recorder).await;
    let waiting: Vec<_> = (0..MAX_QUEUED as u128).map(|n| spawn_send(&gathered, 1_000 + n)).collect();
    queued(&gathered, MAX_QUEUED).await;
    // One more finds the queue full and goes out beside the calls in flight.
    let alone = spawn_send(&gathered, 5_000);
    recorder.started(MAX_CALLS + 1).await;
    assert_eq!(recorder.calls()[MAX_CALLS], Call::Send(5_000));
    // A lead's caller gives up: the queue is handed over all the same, before any other call
    // ends.
    let lead = leads.remove(0);
    lead.abort();
    assert!(lead.await.unwrap_err().is_cancelled());
    recorder.started(MAX_CALLS + 2).await;
    let expected: Vec<u128> = (0..MAX_QUEUED as u128).map(|n| 1_000 + n).collect();
    assert_eq!(recorder.calls()[MAX_CALLS + 1..], [Call::Batch(expected)]);
    recorder.gate.add_permits(MAX_CALLS + 1);
    alone.await.unwrap().unwrap();
    for outcome in futures::future::join_all(waiting).await {
        outcome.unwrap().unwrap();
    }
    for lead in leads {
        lead.await.unwrap().unwrap();
    }
}
