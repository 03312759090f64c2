//! `llm-esr-orch`: see `llm-esr-orch --help` and the README.

use std::process::ExitCode;

use clap::Parser;
use llm_esr_orch::cli::{run, Cli};
use llm_esr_orch::config::is_config_error;

fn main() -> ExitCode {
    // candle's elementwise thread pool spin-waits; on few cores one thread for
    // it (gemm keeps its own) is measurably faster. Respect an explicit value.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if is_config_error(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
