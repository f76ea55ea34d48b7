//! `statehouse-server`: the built-in entity types behind the standard command line.

use std::process::ExitCode;

use statehouse_server::behaviour::BehaviourRegistry;

fn main() -> ExitCode {
    statehouse_server::cli::main(BehaviourRegistry::with_builtins())
}
