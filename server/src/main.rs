//! `statehouse-server`: the built-in entity types behind the standard command line.

use std::process::ExitCode;

use statehouse_server::behaviour::BehaviourRegistry;

/// mimalloc instead of the system allocator: the server allocates small, short-lived buffers
/// on every thread (requests, turns, journal frames), where glibc's malloc spent ~20% of the
/// CPU under load (measured with `perf`; see ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    statehouse_server::cli::main(BehaviourRegistry::with_builtins())
}
