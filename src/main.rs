//! termtune's entry point: parse the command line, start logging, run.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = termtune::cli::Cli::parse();
    let _log_guard = termtune::logging::init(cli.log_file.as_deref());
    termtune::panic::install_hook();
    termtune::commands::run(cli)
}
