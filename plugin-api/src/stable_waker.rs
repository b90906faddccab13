//! A waker handed across the plugin boundary as the same pointer for as long as it wakes the
//! same task, so that the other side keeps it instead of cloning it at every call.
//!
//! `async_ffi` wraps a waker anew for every call that crosses the boundary
//! (`ContextExt::with_ffi_context`: a block on the caller's stack), and a clone the other side
//! keeps is a new allocation. A reactor or a channel that keeps a waker asks `Waker::will_wake`
//! whether the waker of a new call is the one it keeps; across the boundary it never is, so
//! every call that registers a wait cloned the waker (an allocation) and dropped the clone it
//! replaced. In a profile of the TCP round trip the host's reactor registering the plugin's
//! reader and writer was an eighth of all allocations.
//!
//! [`StableWaker`] wraps the caller's waker once, in a reference-counted block whose clones are
//! the same pointer: the other side sees the same waker at every call and keeps the one it has.
//! The block starts with what `async_ffi` reads of a waker (a pointer to its table of four
//! functions), and the context handed over is the pointer to it: the layout of `async_ffi`'s
//! `FfiContext`, `FfiWakerBase` and `FfiWakerVTable`, which are `#[repr(C)]` and part of the
//! contract's layout check.

use comms_core::async_ffi::FfiContext;
use std::{
    ptr::NonNull,
    sync::atomic::{fence, AtomicUsize, Ordering},
    task::Waker,
};

/// `async_ffi`'s table of waker functions, field for field.
#[repr(C)]
struct WakerTable {
    clone: unsafe extern "C" fn(*const SharedWaker) -> *const SharedWaker,
    wake: unsafe extern "C" fn(*const SharedWaker),
    wake_by_ref: unsafe extern "C" fn(*const SharedWaker),
    drop: unsafe extern "C" fn(*const SharedWaker),
}

/// The block the other side holds: `async_ffi`'s waker base (the table) first.
#[repr(C)]
struct SharedWaker {
    table: &'static WakerTable,
    references: AtomicUsize,
    waker: Waker,
}

static TABLE: WakerTable = WakerTable { clone, wake, wake_by_ref, drop: release };

/// A clone is one more reference to the same block.
unsafe extern "C" fn clone(shared: *const SharedWaker) -> *const SharedWaker {
    // SAFETY: the caller holds a reference: the block is alive.
    unsafe { &*shared }.references.fetch_add(1, Ordering::Relaxed);
    shared
}

/// Wakes and gives up the caller's reference.
unsafe extern "C" fn wake(shared: *const SharedWaker) {
    // SAFETY: the caller holds a reference, which this call consumes.
    unsafe {
        wake_by_ref(shared);
        release(shared);
    }
}

unsafe extern "C" fn wake_by_ref(shared: *const SharedWaker) {
    // SAFETY: the caller holds a reference: the block is alive.
    unsafe { &*shared }.waker.wake_by_ref();
}

/// Gives up one reference; the last frees the block.
unsafe extern "C" fn release(shared: *const SharedWaker) {
    // SAFETY: the caller holds a reference: the block is alive until it is given up here.
    if unsafe { &*shared }.references.fetch_sub(1, Ordering::Release) == 1 {
        fence(Ordering::Acquire);
        // SAFETY: the block came from `Box::leak` in `StableWaker::context`, and this was its
        // last reference.
        drop(unsafe { Box::from_raw(shared.cast_mut()) });
    }
}

/// The waker of the task that polls one side of an object (a socket's reading, say), handed
/// across the boundary as the same pointer while it wakes the same task.
pub(crate) struct StableWaker(Option<NonNull<SharedWaker>>);

// SAFETY: the block holds a `Waker` (`Send + Sync`) and an atomic count, and is freed by
// whoever gives up its last reference.
unsafe impl Send for StableWaker {}
// SAFETY: as above; `&StableWaker` gives access to nothing.
unsafe impl Sync for StableWaker {}

impl StableWaker {
    pub(crate) const fn new() -> Self {
        Self(None)
    }

    /// Runs `call` with a context for `waker`: the same pointer as at the previous call when
    /// `waker` wakes the same task, else a new block (and the previous one is given up).
    pub(crate) fn with_context<T>(
        &mut self,
        waker: &Waker,
        call: impl FnOnce(&mut FfiContext<'_>) -> T,
    ) -> T {
        let shared = match self.0 {
            // SAFETY: `self` holds a reference: the block is alive.
            Some(shared) if unsafe { shared.as_ref() }.waker.will_wake(waker) => shared,
            _ => {
                let block =
                    SharedWaker { table: &TABLE, references: AtomicUsize::new(1), waker: waker.clone() };
                let fresh = NonNull::from(Box::leak(Box::new(block)));
                if let Some(previous) = self.0.replace(fresh) {
                    // SAFETY: `self` held this reference.
                    unsafe { release(previous.as_ptr()) };
                }
                fresh
            }
        };
        // SAFETY: `FfiContext` is `#[repr(C)]`: a pointer to the waker base and a zero-sized
        // marker; the block starts with the base. The other side may only clone (a new
        // reference), wake by reference or drop its clones: `self` keeps its own reference
        // until after the call.
        let mut context =
            unsafe { std::mem::transmute::<*const SharedWaker, FfiContext<'_>>(shared.as_ptr()) };
        call(&mut context)
    }
}

impl Drop for StableWaker {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            // SAFETY: `self` held this reference.
            unsafe { release(shared.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_core::async_ffi::FfiContext;
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering::Relaxed},
            Arc,
        },
        task::Wake,
    };

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// What the other side keeps of a call's context, as tokio's reactor does: a clone, kept
    /// while `will_wake` says the new one is the same.
    fn keep(kept: &mut Option<Waker>, context: &mut FfiContext<'_>) -> bool {
        context.with_context(|cx| match kept {
            Some(waker) if waker.will_wake(cx.waker()) => false,
            _ => {
                *kept = Some(cx.waker().clone());
                true
            }
        })
    }

    #[test]
    fn the_other_side_keeps_one_clone_for_one_task_and_its_wakes_reach_the_task() {
        let task = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        let mut stable = StableWaker::new();
        let mut kept = None;
        let cloned: Vec<bool> =
            (0..3).map(|_| stable.with_context(&waker, |cx| keep(&mut kept, cx))).collect();
        assert_eq!(cloned, [true, false, false], "cloned once, then the same waker");
        kept.as_ref().unwrap().wake_by_ref();
        kept.take().unwrap().wake();
        assert_eq!(task.0.load(Relaxed), 2, "both wakes reached the task");

        // Another task: a new block, and the other side clones again.
        let other = Arc::new(Counting(AtomicUsize::new(0)));
        let mut kept = None;
        assert!(stable.with_context(&Waker::from(Arc::clone(&other)), |cx| keep(&mut kept, cx)));
        drop(stable);
        kept.take().unwrap().wake();
        assert_eq!(other.0.load(Relaxed), 1, "a clone outlives the stable waker");
        assert_eq!(Arc::strong_count(&other), 1, "the last reference freed the block and its waker");
        assert_eq!(
            Arc::strong_count(&task),
            2,
            "the first task's block is freed too (the test holds `waker`)"
        );
    }
}
