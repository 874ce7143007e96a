//! The `ferry` binary: parses arguments, sets up logging, runs the command.

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

// Every handled message creates and drops a Wasm store, its instance and many small buffers
// (JSON, sled nodes) across threads; mimalloc's per-thread heaps cut the host's CPU per command
// by about a fifth against glibc's allocator (ARCHITECTURE.md, "Allocation").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = ferry::cli::Cli::parse();
    // Before anything is created: the store, the maildir and the socket are the owner's only.
    // (`ferry new` writes a service's sources, which keep the shell's umask.)
    if !matches!(cli.command, ferry::cli::Command::New { .. }) {
        ferry::files::keep_private();
    }
    // `ferry test` starts and stops the service once per scenario, and parks the messages of
    // the scenarios that expect a failure: only errors are news there.
    let quiet = matches!(cli.command, ferry::cli::Command::Test { .. });
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(if quiet { "error" } else { "info" })),
        )
        .with_writer(std::io::stderr)
        .init();
    match ferry::cli::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
