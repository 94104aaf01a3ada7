//! The `tally` binary's library half: command-line settings, process wiring, embedded services
//! and the benchmark. `main.rs` only dispatches; integration tests drive the same wiring.

pub mod audit;
pub mod bench;
pub mod cli;
pub mod history;
pub mod services;
pub mod stack;
pub mod whatif;
