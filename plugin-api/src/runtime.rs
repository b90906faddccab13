//! The plugin-side tokio runtime and the guard every call into a plugin runs under.
//!
//! tokio does not cross a `cdylib` boundary: each plugin library links its own copy, whose
//! reactor and timers are invisible to the host's copy. So every plugin owns a multi-thread
//! runtime (created on first use), and every poll and every drop of a plugin future enters that
//! runtime. The host can then poll plugin futures from any executor: tokio multi-thread,
//! current-thread, or none at all.
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
    sync::OnceLock,
    task::{Context, Poll},
};
use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads of the plugin runtime. Plugins do I/O, not computation, so two are plenty and
/// leave the cores to the application.
const PLUGIN_WORKER_THREADS: usize = 2;

/// The runtime of this plugin library (one per loaded library), created on first use.
pub fn plugin_runtime() -> &'static Handle {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        init_plugin_logging();
        RUNTIME
            .get_or_init(|| {
                Builder::new_multi_thread()
                    .worker_threads(PLUGIN_WORKER_THREADS)
                    .thread_name("comms-plugin")
                    .enable_all()
                    .build()
                    .expect("the plugin runtime could not start (out of threads or file descriptors)")
            })
            .handle()
            .clone()
    })
}

/// Sends this library's `tracing` events to stderr, filtered by `RUST_LOG` (default `warn`).
///
/// A dynamically loaded plugin has its own copy of `tracing`, whose global dispatcher the host's
/// subscriber never sees, so without this a plugin's logs would vanish. When the plugin is linked
/// into the program instead, the program's subscriber is already set and is kept.
fn init_plugin_logging() {
    if tracing::dispatcher::has_been_set() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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
            let _runtime = plugin_runtime().enter();
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
            let _runtime = plugin_runtime().enter();
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
pub fn guard_future<T, F>(place: &'static str, future: F) -> FfiFuture<RResult<T, CommsError>>
where
    T: Send + 'static,
    F: Future<Output = Result<T, PluginError>> + Send + 'static,
{
    FfiFuture::new(Guarded { place, inner: Some(Box::pin(future)) })
}

/// Runs a synchronous plugin entry point inside the plugin runtime, turning a panic into an error.
pub fn guard_call<T>(
    place: &'static str,
    call: impl FnOnce() -> Result<T, PluginError>,
) -> RResult<T, CommsError> {
    let _runtime = plugin_runtime().enter();
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(PluginError::into_abi).into(),
        Err(panic) => RResult::RErr(PluginError::panicked(place, panic.as_ref()).into_abi()),
    }
}
