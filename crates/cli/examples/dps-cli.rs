//! The CLI without the server: `cargo run -p dps-cli --example dps-cli -- enrollment list`.
//! (The `dps` binary of the server crate runs the same commands, plus `serve`.)

use clap::Parser;

fn main() -> std::process::ExitCode {
    dps_cli::run(dps_cli::Cli::parse())
}
