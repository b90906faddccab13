//! The plugin-side tokio runtime and the guard every call into a plugin runs under.
//!
//! tokio does not cross a `cdylib` boundary: each plugin library links its own copy, whose
//! reactor and timers are invisible to the host's copy. So every plugin owns a multi-thread
//! runtime (created on first use), and every poll and every drop of a plugin future enters that
//! runtime. The host can then poll plugin futures from any executor: tokio multi-thread,
//! current-thread, or none at all.
//!
//! A plugin linked into the host program (no shared library: the same tokio copy), when polled
//! from inside the host's runtime, runs on that runtime: no second runtime, no extra threads.
//! (Static discovery is such a plugin.)
//!
//! The same guard catches panics: a panic inside a plugin becomes a
//! [`ErrorCode::PANICKED`](crate::ErrorCode::PANICKED) error value at the host, never an abort
//! or a host-side panic.

use crate::PluginError;
use comms_core::{abi_stable::std_types::RResult, async_ffi::FfiFuture, CommsError};
use std::{
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll, Waker},
};
use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads of the plugin runtime when neither the host nor the plugin
/// ([`crate::Plugin::WORKER_THREADS`]) says: plugins do I/O, not computation, so two are plenty
/// and leave the cores to the application.
pub const DEFAULT_WORKER_THREADS: usize = 2;

/// The worker threads the host asked for (0: not asked), set before the runtime starts.
static REQUESTED_WORKER_THREADS: AtomicUsize = AtomicUsize::new(0);

/// The plugin's name ([`crate::Plugin::NAME`]), set when the host loads the library.
static PLUGIN_NAME: OnceLock<&'static str> = OnceLock::new();

/// Sets the number of worker threads of this library's runtime, if it has not started yet, and
/// the plugin's name its threads carry.
pub(crate) fn request_worker_threads(plugin: &'static str, threads: usize) {
    let _ = PLUGIN_NAME.set(plugin);
    REQUESTED_WORKER_THREADS.store(threads, Ordering::Relaxed);
}

/// The name of this library's runtime threads: `comms-<plugin>` (`comms-tcp`, `comms-redis`), so
/// that `top -H` or `/proc/<pid>/task` tell whose threads they are; `comms-plugin` before the
/// host has loaded the library. Linux keeps the first 15 bytes of a thread's name.
fn thread_name() -> String {
    match PLUGIN_NAME.get() {
        Some(plugin) => format!("comms-{plugin}"),
        None => "comms-plugin".to_string(),
    }
}

/// The runtime of this plugin library (one per loaded library), created on first use with the
/// number of worker threads the host asked for, else the plugin's
/// [`crate::Plugin::WORKER_THREADS`] (else [`DEFAULT_WORKER_THREADS`]).
pub fn plugin_runtime() -> &'static Handle {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let threads = match REQUESTED_WORKER_THREADS.load(Ordering::Relaxed) {
            0 => DEFAULT_WORKER_THREADS,
            n => n,
        };
        RUNTIME
            .get_or_init(|| {
                Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name(thread_name())
                    .enable_all()
                    .build()
                    .expect("the plugin runtime could not start (out of threads or file descriptors)")
            })
            .handle()
            .clone()
    })
}

/// Enters the plugin runtime, unless a runtime of this library's tokio is current already: the
/// plugin runtime's own workers, or (for a plugin linked into the host, which shares the host's
/// tokio) the host's runtime. A plugin in a shared library never sees the host's runtime (its
/// tokio is another copy), so it always runs on its own.
fn enter_runtime() -> Option<tokio::runtime::EnterGuard<'static>> {
    match Handle::try_current() {
        Ok(_) => None,
        Err(_) => Some(plugin_runtime().enter()),
    }
}

type BoxedResultFuture<T> = Pin<Box<dyn Future<Output = Result<T, PluginError>> + Send>>;

/// A plugin future made safe to hand to the host: polled and dropped inside the plugin runtime,
/// with panics turned into errors.
struct Guarded<T> {
    place: &'static str,
    inner: Option<BoxedResultFuture<T>>,
}

impl<T> Future for Guarded<T> {
    type Output = RResult<T, CommsError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(RResult::RErr(
                PluginError::new(comms_core::ErrorCode::OTHER, "future polled after completion").into_abi(),
            ));
        };
        let outcome = {
            let _runtime = enter_runtime();
            catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx)))
        };
        match outcome {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => {
                this.drop_inner();
                Poll::Ready(result.map_err(PluginError::into_abi).into())
            }
            Err(panic) => {
                let error = PluginError::panicked(this.place, panic.as_ref());
                this.drop_inner();
                Poll::Ready(RResult::RErr(error.into_abi()))
            }
        }
    }
}

impl<T> Guarded<T> {
    fn drop_inner(&mut self) {
        if let Some(inner) = self.inner.take() {
            let _runtime = enter_runtime();
            // A panic while dropping plugin state must not unwind into the host either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
        }
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.drop_inner();
    }
}

/// Wraps a plugin future for the boundary. `place` names the operation in a panic message.
pub(crate) fn guard_future<T, F>(place: &'static str, future: F) -> FfiFuture<RResult<T, CommsError>>
where
    T: Send + 'static,
    F: Future<Output = Result<T, PluginError>> + Send + 'static,
{
    FfiFuture::new(Guarded { place, inner: Some(Box::pin(future)) })
}

/// Runs a synchronous plugin entry point inside the plugin runtime, turning a panic into an error.
pub(crate) fn guard_call<T>(
    place: &'static str,
    call: impl FnOnce() -> Result<T, PluginError>,
) -> RResult<T, CommsError> {
    let _runtime = enter_runtime();
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(PluginError::into_abi).into(),
        Err(panic) => RResult::RErr(PluginError::panicked(place, panic.as_ref()).into_abi()),
    }
}

/// A task started with [`spawn`]: wait for its end, or stop it. Dropping it lets the task run on.
#[derive(Debug)]
pub struct Task {
    /// Sending stops the task; dropping it does not.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Closed (its sender dropped) when the task has ended, whatever the executor.
    ended: tokio::sync::oneshot::Receiver<()>,
}

impl Task {
    /// Whether the task has ended (finished, stopped, panicked or dropped with its executor).
    pub fn is_finished(&mut self) -> bool {
        matches!(self.ended.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed))
    }

    /// Stops the task at its next await point (dropping its future).
    pub fn abort(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the task to end.
    pub async fn wait(&mut self) {
        let _ = (&mut self.ended).await;
    }
}

/// Runs `future` as a task of this plugin: on the host's executor when the host runs plugin
/// tasks (contract 1.1, and the caller is on a host runtime thread: a future the host polls, or
/// a task already on the host's executor), else on this library's runtime (on the host's own
/// runtime for a plugin linked into the program). Either way the future runs inside the plugin
/// runtime's context (its timers and its own sockets work) and a panic in it ends the task with
/// a logged error, never the host.
///
/// Tasks on the host's executor are woken by the host's threads: with sockets the host drives
/// ([`crate::host_driven`]), a connection's reader and writer then never wait for a thread of
/// the plugin's runtime.
pub fn spawn<F>(future: F) -> Task
where
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ended_sender, ended) = tokio::sync::oneshot::channel::<()>();
    let task = async move {
        // Dropped when the task ends or its future is dropped: either way `Task` sees the end.
        let _ended = ended_sender;
        let stopped = async move {
            if stopped.await.is_err() {
                // The `Task` was dropped without stopping it: run on.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            () = stopped => {}
            () = future => {}
        }
    };
    let task = FfiFuture::new(GuardedTask { inner: Some(Box::pin(task)), waker: None });
    let task = match crate::host_driven::host() {
        Some(host) => host.spawn(task).into_option(),
        None => Some(task),
    };
    if let Some(task) = task {
        let _runtime = enter_runtime();
        drop(tokio::spawn(task));
    }
    Task { stop: Some(stop), ended }
}

/// A task's future made safe for any executor: polled and dropped inside the plugin runtime, a
/// panic logged and turned into the end of the task.
struct GuardedTask {
    inner: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The waker of the task this future is the root of: made at its first poll and given to
    /// the inner future at every poll. Through the boundary a task gets a new waker at every
    /// poll (`async_ffi` wraps the host's for the call), and the clones of that are new
    /// allocations, none the same as another: every wait the task registered again cloned it,
    /// and the host sockets' stable wakers ([`crate::stable_waker`]) could never tell that it
    /// wakes the same task. This one is reference-counted, so its clones are the same waker
    /// (`Waker::will_wake` holds). The root of a task is polled by that task alone, whose
    /// waker stays the same.
    waker: Option<Waker>,
}

/// A task's waker whose clones share it (see [`GuardedTask`]).
struct TaskWaker(Waker);

impl std::task::Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.0.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake_by_ref();
    }
}

impl Future for GuardedTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(()) };
        let waker = this.waker.get_or_insert_with(|| Waker::from(Arc::new(TaskWaker(cx.waker().clone()))));
        let mut cx = Context::from_waker(waker);
        let outcome = {
            let _runtime = enter_runtime();
            catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(&mut cx)))
        };
        match outcome {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => {
                this.drop_inner();
                Poll::Ready(())
            }
            Err(panic) => {
                tracing::error!("{}", PluginError::panicked("a task", panic.as_ref()).message);
                this.drop_inner();
                Poll::Ready(())
            }
        }
    }
}

impl GuardedTask {
    fn drop_inner(&mut self) {
        if let Some(inner) = self.inner.take() {
            let _runtime = enter_runtime();
            let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
        }
    }
}

impl Drop for GuardedTask {
    fn drop(&mut self) {
        self.drop_inner();
    }
}
