//! The plugin library's own heap (cargo feature `own-allocator`): mimalloc as its global
//! allocator.
//!
//! A plugin library is a program of its own as far as allocation goes: its Rust code allocates
//! through its own global allocator, and everything it hands to the host (vectors, strings,
//! shared payload buffers) is freed through the vtables of the boundary's types, that is by the
//! library's own code. So a plugin can pick its allocator without the host's consent, and
//! this feature picks mimalloc for it.
//!
//! ## Why
//!
//! With glibc's allocator, a stream of large messages makes the process give memory back to the
//! system and take it again for every few messages:
//! - glibc returns the top of a thread's heap to the system (`madvise`) whenever freeing a block
//!   of 64 KiB or more leaves more than 128 KiB free there;
//! - a receiving connection reads each 64 KiB message into a fresh buffer (the previous one is
//!   still held by the application), so the next buffer lands on pages the kernel must hand
//!   out and zero again.
//!
//! Measured (`cargo bench -p comms-tests --bench tcp_throughput`, variant a, 64 KiB payloads,
//! `COMMS_BENCH_SCALE=0.5`, three alternating runs): 0.50M page faults and 32k msg/s with
//! glibc, 900 page faults and 69k to 74k msg/s with this allocator. The small messages'
//! allocations get cheaper too (glibc merges its free lists at every allocation of 1 KiB or
//! more).
//!
//! ## Limits
//!
//! - The feature declares a `#[global_allocator]` in this crate: **every** binary linking
//!   comms-plugin-api with the feature uses mimalloc, and cannot declare an allocator of its own
//!   (rustc refuses two). Turn it on in plugin libraries (cdylibs), not in applications; an
//!   application that links a plugin crate statically should turn that crate's default
//!   features off (as `comms-tests` does with `comms-tcp`). The host never turns it on.
//! - Cargo unifies features within one build: a workspace that builds a plugin library and a
//!   program in one command (`cargo test --workspace`) links the program with mimalloc too.
//!   Harmless, but a benchmark comparing allocators must be built on its own
//!   (`cargo bench -p ...`).
//! - Each library that turns it on has a heap of its own: memory a plugin holds is not reused by
//!   the host and the other way round. mimalloc gives unused memory back to the system after a
//!   delay, as glibc does at once.
//! - It uses the thread-local model that works in a library opened with `dlopen`
//!   (`local_dynamic_tls`), slightly slower than the one for programs, and mimalloc's v2 line:
//!   the v3 line crashed in the first allocation of a thread started inside a loaded plugin.

/// The global allocator of the library linking this crate with the feature on.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
