//! `statehouse-server`: the built-in entity types behind the standard command line.

use std::process::ExitCode;

use statehouse_server::behaviour::BehaviourRegistry;
use statehouse_server::stats::AllocatorStats;

/// jemalloc instead of the system allocator: the server allocates small, short-lived buffers
/// on every thread (requests, turns, journal frames), where glibc's malloc spent ~20% of the
/// CPU under load, and keeps millions of small entities, where jemalloc holds the least
/// memory of the allocators measured (glibc, mimalloc; see ARCHITECTURE.md). Built with
/// jemalloc's background thread on (the crate's `background_threads` feature): it returns
/// freed pages to the system on time even while the server is idle, so memory that
/// passivated and hibernating entities gave up stops counting as resident.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's figures for `statehouse stats`: advancing its epoch refreshes them.
fn jemalloc_stats() -> Option<AllocatorStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(AllocatorStats {
        allocated_bytes: stats::allocated::read().ok()? as u64,
        resident_bytes: stats::resident::read().ok()? as u64,
    })
}

fn main() -> ExitCode {
    statehouse_server::cli::main_with_allocator_probe(
        BehaviourRegistry::with_builtins(),
        jemalloc_stats,
    )
}
