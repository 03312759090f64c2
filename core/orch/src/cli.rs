//! Command-line interface of `llm-esr-orch`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::logging::{self, LogFormat};
use crate::{assemble, plugin_host, train};

#[derive(Parser, Debug)]
#[command(
    name = "llm-esr-orch",
    version,
    about = "LLM-ESR experiments: plugins, data-parallel training, long-tail metrics"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every plugin found on the plugin path, with refusals and their fix.
    Plugins {
        /// Also search the `plugins.paths` of this config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train and evaluate one experiment (under mpirun: data parallel).
    Train {
        config: PathBuf,
        /// Override a config value: `--set train.epochs=5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in the config's run directory from its last checkpoint.
        #[arg(long)]
        resume: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plugins { config } => {
            logging::init(cli.log_format, 0);
            let dirs = match config {
                Some(path) => assemble::plugin_dirs(&Config::load(&path, &[])?)?,
                None => plugin_host::search_dirs(&[]),
            };
            list_plugins(&dirs);
            Ok(())
        }
        Command::Train {
            config,
            set,
            resume,
        } => {
            let cfg = Config::load(&config, &set)?;
            let backend = llm_esr_comm::Backend::parse(&cfg.distributed.backend)
                .context("config key `distributed.backend`")?;
            let comm = llm_esr_comm::init(backend)?;
            logging::init(cli.log_format, comm.rank());
            train::train(&cfg, &train::TrainOptions { resume }, comm.as_ref())?;
            Ok(())
        }
    }
}

fn list_plugins(dirs: &[PathBuf]) {
    let found = plugin_host::discover(dirs);
    println!(
        "{:<10} {:<16} {:<8} {:<8} path",
        "kind", "name", "version", "status"
    );
    for f in &found {
        let (kind, name, version) = match &f.info {
            Some(i) => (i.kind.as_str(), i.name.as_str(), i.version.as_str()),
            None => ("?", "?", "?"),
        };
        let status = if f.refused.is_some() { "refused" } else { "ok" };
        println!(
            "{kind:<10} {name:<16} {version:<8} {status:<8} {}",
            f.path.display()
        );
        if let Some(why) = &f.refused {
            println!("{:<10} reason: {why}", "");
        }
    }
    if found.is_empty() {
        println!(
            "(none) searched: {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
