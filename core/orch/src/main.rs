//! `llm-esr-orch`: see `llm-esr-orch --help` and the README.

use std::process::ExitCode;

use clap::Parser;
use llm_esr_orch::cli::{run, Cli, Command};
use llm_esr_orch::config::is_config_error;

/// Training allocates and frees many large tensors per step; glibc's default
/// returns each one to the kernel (mmap/munmap), and the page faults cost as
/// much system time as the arithmetic. Keep freed memory in the heap instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_TOP_PAD: std::ffi::c_int = -2;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 512 << 20);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Rust ignores SIGPIPE, so `llm-esr-orch plugins | head` would panic on the
/// closed pipe. Commands that print for a reader end quietly instead, like
/// other Unix tools. Training keeps the default (MPI's sockets are its own).
#[cfg(unix)]
fn quiet_on_closed_pipe() {
    extern "C" {
        fn signal(signum: std::ffi::c_int, handler: usize) -> usize;
    }
    const SIGPIPE: std::ffi::c_int = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restores the default disposition before any thread starts.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn quiet_on_closed_pipe() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // Training: candle's elementwise thread pool spin-waits, and on few cores
    // one thread for it (gemm keeps its own) is measurably faster. The
    // forward-only text encoder (`embed`) is faster with the pool. Respect an
    // explicit value.
    let training = matches!(
        cli.command,
        Command::Train { .. } | Command::Bench { .. } | Command::Sweep { .. }
    );
    if !training {
        quiet_on_closed_pipe();
    }
    if training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
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
