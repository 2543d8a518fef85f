//! The command line. `-c` is ours: pingora's own option parser never sees
//! argv; its settings come from the `server:` section of our YAML.

use crate::config::{Config, EMBEDDED_DEFAULT};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "session-gateway",
    version,
    about = "A reverse proxy that gives any web app server-side sessions"
)]
pub struct Cli {
    /// Configuration file (YAML). Without it, the embedded default
    /// (conf/gateway.yaml) is used.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, connect to the store, print what would
    /// run, and exit (same as the `check` command).
    #[arg(short = 't', long = "test")]
    pub test: bool,

    /// With --test/check: validate the configuration only, without
    /// connecting to the store (e.g. in a build pipeline).
    #[arg(long = "no-connect")]
    pub no_connect: bool,

    /// Also serve the bundled demo app on the first upstream address.
    #[arg(long)]
    pub demo: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and the store connection, then exit.
    Check,
    /// Remove expired sessions once and exit (for cron; stores without
    /// native expiry only).
    Cleanup,
}

/// Parse argv, run, and return the process exit code (after the log
/// writer has written out every line).
pub fn main() -> i32 {
    let code = run_cli();
    crate::telemetry::flush();
    code
}

/// Print a failure as the last line on stderr, after every log line
/// written before it (the log is buffered), and return exit code 1.
fn fail(e: impl std::fmt::Display) -> i32 {
    crate::telemetry::flush();
    eprintln!("error: {e}");
    1
}

fn run_cli() -> i32 {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => Config::from_file(path),
        None => Config::from_yaml(EMBEDDED_DEFAULT),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    crate::telemetry::init(
        &config.log_level,
        config.log_format == crate::config::LogFormat::Json,
    );
    let command = match (&cli.command, cli.test) {
        (_, true) => Command::Check,
        (Some(Command::Check), _) => Command::Check,
        (Some(Command::Cleanup), _) => Command::Cleanup,
        _ => Command::Run,
    };
    match command {
        Command::Check => match crate::app::check(&config, !cli.no_connect) {
            Ok(summary) => {
                println!("{summary}");
                0
            }
            Err(e) => fail(e),
        },
        Command::Cleanup => match crate::app::cleanup(&config) {
            Ok(n) => {
                println!("removed {n} expired session(s)");
                0
            }
            Err(e) => fail(e),
        },
        Command::Run => match crate::app::run(config, cli.config.clone(), cli.demo) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
    }
}
