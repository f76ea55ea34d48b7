//! `statehouse-test-server`: statehouse with two extra entity types, `crashy` and `watcher`
//! (see `statehouse_tests::behaviours`), for the end-to-end tests.
//!
//! It is also the smallest complete example of embedding statehouse with your own Rust
//! behaviours: build a registry, then hand it to `statehouse_server::cli::main`, which gives
//! the binary the same flags, config file, logging and signal handling as
//! `statehouse-server`.

use std::process::ExitCode;

fn main() -> ExitCode {
    statehouse_server::cli::main(statehouse_tests::behaviours::registry())
}
