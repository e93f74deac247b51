//! `cliqgate`: CLI, logging and exit codes. Wiring only.
#![forbid(unsafe_code)]

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cliqgate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc returns memory freed by idle keys to the OS; glibc's malloc keeps most of it
/// (benches/RESULTS-micro.md). The library never picks an allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits.h EX_USAGE: the config (the program's input) is wrong.
const EXIT_BAD_CONFIG: u8 = 64;
/// sysexits.h EX_UNAVAILABLE: a listener could not be bound, the CA file unreadable, ...
const EXIT_CANNOT_START: u8 = 69;

#[derive(Parser)]
#[command(
    name = "cliqgate",
    version,
    about = "Rate-limiting reverse proxy for the Zoho Cliq API"
)]
struct Cli {
    /// The YAML config file.
    #[arg(long, short, global = true, default_value = "config/cliq.yaml")]
    config: PathBuf,
    /// Proxy worker threads, each serving its share of connections on its own event loop
    /// [default: one per CPU].
    #[arg(long, env = "CLIQGATE_WORKERS", value_name = "N")]
    workers: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the route table; exit 64 if it is invalid.
    Check,
    /// Print the JSON Schema of the config file (for editors and CI); reads no config.
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        let _ = std::io::stdout()
            .lock()
            .write_all(cliqgate::config::JSON_SCHEMA.as_bytes());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!(
                "cliqgate: {} is not a valid config:\n{errors}",
                cli.config.display()
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            // A closed pipe (`cliqgate check | head`) is not an error worth a panic.
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", config.describe());
            let _ = writeln!(out, "{}: OK", cli.config.display());
            ExitCode::SUCCESS
        }
        Some(Command::Schema) => unreachable!("handled before the config is read"),
        None => run(config, cli.config, cli.workers),
    }
}

fn init_logging(config: &Config) {
    // RUST_LOG, when set, overrides the configured level.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Colours only on a terminal: log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn run(config: Config, config_path: PathBuf, workers: Option<NonZeroUsize>) -> ExitCode {
    init_logging(&config);
    let workers = workers.unwrap_or_else(cliqgate::app::default_workers);
    // This thread's runtime carries signals, the admin listener and housekeeping; the proxy
    // listener has its own worker threads (`app::start_with_workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cliqgate: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    runtime.block_on(async move {
        let signals = match cliqgate::app::Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return ExitCode::from(EXIT_CANNOT_START);
            }
        };
        let running = match cliqgate::app::start_with_workers(config, workers).await {
            Ok(running) => running,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(EXIT_CANNOT_START);
            }
        };
        // SIGHUP reloads the config; SIGTERM/SIGINT drain and stop.
        cliqgate::app::run_until_signalled(running, signals, config_path).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}
