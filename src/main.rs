//! termtune's entry point: parse the command line, start logging, run.
use std::process::ExitCode;

use clap::Parser;

/// candle allocates a fresh buffer for every op result; with glibc each large one was mapped, page-faulted and
/// zeroed anew. mimalloc reuses freed pages: single-thread CPU time per 4×256 step 5.17–5.71 s with glibc,
/// 4.38–4.65 s with mimalloc (`cargo test --release --test integration engine_bench -- --ignored --nocapture`).
/// The allocator is the program's choice, so it lives here and not in the library; the integration tests
/// declare the same one (tests/main.rs) so the engine benchmark measures what the program runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
fn main() -> ExitCode {
    // SAFETY: the first thing main does, before any other thread exists.
    unsafe { termtune::commands::pin_thread_count() };
    let cli = termtune::cli::Cli::parse();
    let _log_guard = termtune::logging::init(cli.log_file.as_deref());
    termtune::panic::install_hook();
    termtune::commands::run(cli)
}
