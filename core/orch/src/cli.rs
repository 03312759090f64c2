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
    /// List the plugin files found on the plugin path (without opening them);
    /// with --inspect, check each one, with refusals and their fix.
    Plugins {
        /// Also search the `plugins.paths` of this config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Open each file in a child process, read and check its declaration
        /// and call its `create` (a crash there is listed as a refusal).
        #[arg(long)]
        inspect: bool,
    },
    /// Internal: inspect one plugin file, for `plugins --inspect` and the
    /// probe before loading a plugin. Prints JSON lines.
    #[command(name = "__inspect-plugin", hide = true)]
    InspectPlugin { path: PathBuf },
    /// Train and evaluate one experiment (under mpirun: data parallel).
    Train {
        config: PathBuf,
        /// Override a config value: `--set train.epochs=5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in the config's run directory from its last checkpoint.
        /// The config must equal the saved one except train.epochs,
        /// train.max_steps and train.patience.
        #[arg(long)]
        resume: bool,
        /// With --resume: accept a config that differs from the saved one.
        #[arg(long, requires = "resume")]
        force_config: bool,
    },
    /// Raw interactions (`prepare.*`) -> a prepared dataset in `data.dir`.
    Prepare {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Prepared dataset (`data.dir`) -> semantic artifacts in `model.artifacts`:
    /// item and user embeddings, PCA initialisation, similar users.
    Embed {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Recompute every stage even when its manifest entry matches.
        #[arg(long)]
        force: bool,
    },
    /// Top-K items for users from a finished run (best parameters and cached
    /// artifacts only; no language model is called). Prints JSON.
    Recommend {
        /// A run directory written by `train`.
        run_dir: PathBuf,
        /// User ids of the prepared dataset (repeatable).
        #[arg(long = "user", required = true, num_args = 1..)]
        users: Vec<u32>,
        #[arg(long, default_value_t = 10)]
        k: usize,
    },
    /// Run every experiment of a sweep file in turn (finished runs are
    /// skipped, interrupted ones resumed), then print their table.
    Sweep {
        sweep: PathBuf,
        /// Extra overrides for every run.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Ranks that train one run together; the job's ranks split into
        /// groups of this size that share the sweep's queue.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        ranks_per_run: u32,
        /// Print every run with its run directory and overrides, and stop.
        #[arg(long)]
        dry_run: bool,
        /// Train again finished runs whose config changed (their old
        /// directories are kept, renamed `<run>.replaced-<time>`).
        #[arg(long)]
        rerun_changed: bool,
        /// Take failed runs (those with a failed.txt) again.
        #[arg(long)]
        retry_failed: bool,
    },
    /// Benchmark: median time of a training step (and the epoch it implies),
    /// of an evaluation pass, or of encoding user prompts. Prints JSON;
    /// writes nothing else (but `--prompts-out`).
    Bench {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// What to time: a training step, an evaluation pass over the
        /// validation users, or encoding the first `--users` user prompts.
        #[arg(long, value_enum, default_value = "step")]
        what: crate::bench::What,
        /// Timed repetitions (steps, passes or encodings), 1..=100000.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        steps: u32,
        /// Untimed repetitions first, 0..=100000.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        warmup: u32,
        /// With `--what embed`: encode the prompts of users 1..=N, 1..=10000000.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        users: u32,
        /// With `--what embed`: also write the prompts, one JSON string a line.
        #[arg(long, value_name = "FILE")]
        prompts_out: Option<PathBuf>,
    },
    /// Summarise finished runs: variants (runs differing only by seed) with
    /// mean +- std over seeds per long-tail group, paired tests against a
    /// baseline; Markdown on stdout, CSV, LaTeX and plots on request.
    Report {
        /// Run directories (with a results.json) and/or sweep directories
        /// (with a sweep.json).
        paths: Vec<PathBuf>,
        /// The variant the others are tested against (default: the sweep's
        /// `baseline`).
        #[arg(long)]
        baseline: Option<String>,
        /// Write the summary as CSV (means, stds, p-values, users).
        #[arg(long, value_name = "FILE")]
        csv: Option<PathBuf>,
        /// Write the summary as a LaTeX (booktabs) table.
        #[arg(long, value_name = "FILE")]
        latex: Option<PathBuf>,
        /// Draw learning curves, head/tail bars and hyper-parameter curves
        /// (PNG and SVG) into this directory.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// One row per run instead (no seeds grouped, no tests).
        #[arg(long)]
        per_run: bool,
        /// With --per-run: a Markdown table with every group, the best epoch
        /// and the minutes.
        #[arg(long, requires = "per_run")]
        markdown: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    // Each plugin is first opened in a child (this binary, `__inspect-plugin`),
    // so that a crash in its constructors is reported as its failure.
    if let Ok(exe) = std::env::current_exe() {
        plugin_host::probe_with(exe);
    }
    match cli.command {
        Command::Plugins { config, inspect } => {
            logging::init(cli.log_format, 0);
            let dirs = match config {
                Some(path) => assemble::plugin_dirs(&Config::load(&path, &[])?)?,
                None => plugin_host::search_dirs(&[]),
            };
            list_plugins(&dirs, inspect)
        }
        Command::InspectPlugin { path } => plugin_host::inspector_main(&path),
        Command::Train {
            config,
            set,
            resume,
            force_config,
        } => {
            let cfg = Config::load(&config, &set)?;
            let comm = init_comm(&cfg.distributed.backend)?;
            logging::init(cli.log_format, comm.rank());
            let result = train::train(
                &cfg,
                &train::TrainOptions {
                    resume,
                    force_config,
                },
                comm.as_ref(),
            );
            if let Err(e) = &result {
                if comm.size() > 1 {
                    // The other ranks may wait in a collective for this one:
                    // end the whole job instead of hanging in MPI_Finalize.
                    eprintln!("error (rank {}): {e:#}", comm.rank());
                    comm.abort(1);
                }
            }
            result.map(|_| ())
        }
        Command::Sweep {
            sweep,
            set,
            ranks_per_run,
            dry_run,
            rerun_changed,
            retry_failed,
        } => {
            let comm = llm_esr_comm::init(llm_esr_comm::Backend::Auto)?;
            logging::init(cli.log_format, comm.rank());
            let opts = crate::sweep::SweepOptions {
                ranks_per_run: ranks_per_run as usize,
                dry_run,
                rerun_changed,
                retry_failed,
            };
            let result = crate::sweep::run(&sweep, &set, &opts, comm.as_ref());
            match result {
                Ok(summary) => {
                    if let Some(table) = summary {
                        print!("{table}");
                    }
                    Ok(())
                }
                Err(e) if comm.size() > 1 => {
                    eprintln!("error (rank {}): {e:#}", comm.rank());
                    comm.abort(1)
                }
                Err(e) => Err(e),
            }
        }
        Command::Bench {
            config,
            set,
            what,
            steps,
            warmup,
            users,
            prompts_out,
        } => {
            use crate::bench::{Reps, What};
            let cfg = Config::load(&config, &set)?;
            let reps = Reps {
                warmup: warmup as usize,
                timed: steps as usize,
            };
            if prompts_out.is_some() && what != What::Embed {
                return Err(crate::config::config_error(
                    "--prompts-out goes with --what embed (the prompts it encodes)",
                ));
            }
            let out = match what {
                What::Embed => {
                    logging::init(cli.log_format, 0);
                    let mut embed = cfg.embed.clone();
                    embed.model = expand_path("embed.model", &embed.model)?;
                    let dir = cfg.data_dir()?;
                    crate::bench::embed_users(
                        &embed,
                        &dir,
                        users as usize,
                        prompts_out.as_ref(),
                        reps,
                    )?
                }
                What::Step | What::Eval => {
                    let comm = init_comm(&cfg.distributed.backend)?;
                    logging::init(cli.log_format, comm.rank());
                    let ds = crate::preflight::check(&cfg)?;
                    let out = if what == What::Eval {
                        crate::bench::eval_passes(&cfg, ds, comm.as_ref(), reps)?
                    } else {
                        crate::bench::steps(&cfg, ds, comm.as_ref(), reps)?
                    };
                    if comm.rank() != 0 {
                        return Ok(());
                    }
                    out
                }
            };
            println!("{}", serde_json::to_string(&out)?);
            Ok(())
        }
        Command::Prepare { config, set } => {
            logging::init(cli.log_format, 0);
            let cfg = Config::load(&config, &set)?;
            let mut prep = cfg.prepare.clone();
            prep.interactions = expand_path("prepare.interactions", &prep.interactions)?;
            if let Some(p) = &prep.item_text {
                prep.item_text = Some(expand_path("prepare.item_text", p)?);
            }
            let out = cfg.data_dir()?;
            let summary = llm_esr_prep::prepare(&prep, &out)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Embed { config, set, force } => {
            logging::init(cli.log_format, 0);
            let cfg = Config::load(&config, &set)?;
            let mut embed = cfg.embed.clone();
            embed.model = expand_path("embed.model", &embed.model)?;
            let summary =
                llm_esr_prep::embed(&embed, &cfg.data_dir()?, &cfg.artifacts_dir()?, force)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Recommend { run_dir, users, k } => {
            logging::init(cli.log_format, 0);
            let out = crate::recommend::recommend(&run_dir, &users, k)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Report {
            paths,
            baseline,
            csv,
            latex,
            plots,
            per_run,
            markdown,
        } => {
            logging::init(cli.log_format, 0);
            let collection = crate::report::Collection::load(&paths, baseline.as_deref())?;
            if per_run {
                let rows: Vec<(String, serde_json::Value)> = collection
                    .variants
                    .iter()
                    .flat_map(|v| &v.runs)
                    .map(|r| (r.name.clone(), r.results.clone()))
                    .collect();
                if markdown {
                    print!("{}", crate::report::markdown(&rows));
                } else {
                    print!("{}", crate::report::tables(&rows));
                }
                return Ok(());
            }
            let out = crate::report::Outputs {
                csv,
                latex,
                markdown: None,
                plots,
            };
            let (summary, written) = crate::report::write(&collection, &out)?;
            print!("{}", summary.markdown());
            for path in written {
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

/// The communicator of `distributed.backend`. A backend that this build or
/// this launch cannot provide (`nccl` without CUDA, `single` under a launcher
/// that started several ranks) is an error of that key.
fn init_comm(name: &str) -> Result<Box<dyn llm_esr_comm::Communicator>> {
    let key_error = |e: llm_esr_comm::CommError| {
        crate::config::config_error(format!("config key `distributed.backend`: {e}"))
    };
    let backend = llm_esr_comm::Backend::parse(name).map_err(key_error)?;
    llm_esr_comm::resolve(backend, llm_esr_comm::detect_launch().as_ref()).map_err(key_error)?;
    Ok(llm_esr_comm::init(backend)?)
}

fn expand_path(key: &str, path: &std::path::Path) -> Result<PathBuf> {
    Ok(PathBuf::from(crate::config::expand_env(
        key,
        &path.to_string_lossy(),
    )?))
}

/// Lists the plugin files on `dirs`; with `inspect`, each one is checked in a
/// child process (`__inspect-plugin`), so that a file that crashes while
/// loading is listed as refused and the listing goes on.
fn list_plugins(dirs: &[PathBuf], inspect: bool) -> Result<()> {
    let mut found = plugin_host::discover(dirs);
    if inspect {
        let exe =
            std::env::current_exe().context("cannot find this executable to inspect plugins")?;
        for f in &mut found {
            *f = plugin_host::probe(&exe, &f.path);
        }
    }
    println!(
        "{:<10} {:<16} {:<8} {:<13} path",
        "kind", "name", "version", "status"
    );
    for f in &found {
        let (kind, version) = match &f.info {
            Some(i) => (i.kind.as_str(), i.version.as_str()),
            None => ("?", "?"),
        };
        let status = match (f.inspected, &f.refused) {
            (false, _) => "not inspected",
            (true, Some(_)) => "refused",
            (true, None) => "ok",
        };
        println!(
            "{kind:<10} {:<16} {version:<8} {status:<13} {}",
            f.name,
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
    } else if !inspect {
        println!("(names from the file names; `llm-esr-orch plugins --inspect` opens and checks each file in a child process)");
    }
    Ok(())
}
