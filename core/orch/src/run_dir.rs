//! The run directory `<output_dir>/<name>`: the rule for names, the exclusive
//! lock held for the whole run, and the checks that decide, before anything is
//! written, whether a run starts fresh or resumes.
//!
//! The lock is an advisory `flock` on the directory itself, so taking it
//! writes nothing (a refused command leaves the directory byte-identical); the
//! kernel drops it when the process ends, however it ends. Once every check has
//! passed, the holder writes its pid and host to [`HOLDER`] so that a second
//! process can say who holds the run.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::config::{config_error, Config};
use crate::files::write_atomic;

pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const BEST: &str = "best.safetensors";
pub const RESULTS: &str = "results.json";
pub const METRICS: &str = "metrics.jsonl";
pub const RESOLVED: &str = "config.resolved.yaml";
/// [`config_hash`] of the resolved config, beside it.
pub const CONFIG_HASH: &str = "config.sha256";
/// Who holds the lock (pid, host, start time), written after the checks.
pub const HOLDER: &str = "lock.json";

/// Keys a resumed run may change: they extend or shorten the schedule and
/// leave the trajectory up to the stopping point unchanged.
pub const SCHEDULE_KEYS: [&str; 3] = ["train.epochs", "train.max_steps", "train.patience"];

/// Keys that name the directory itself rather than the experiment.
const LOCATION_KEYS: [&str; 3] = ["name", "output_dir", "tracking.tensorboard"];

/// Why `name` cannot be a run name, if it cannot: a run name is one normal
/// path component, so the run directory stays inside `output_dir`.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is `.` or `..`, which would put the run outside its own directory")
    } else if name.contains(['/', '\\']) {
        Some("contains a path separator")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.len() > 200 {
        Some("is longer than 200 bytes")
    } else {
        None
    }
}

/// A run directory whose lock this process holds (rank 0), or that another
/// rank's rank 0 holds (other ranks hold nothing).
pub struct RunDir {
    pub path: PathBuf,
    _lock: Option<File>,
    /// This process made the directory: remove it again if the run fails
    /// before writing anything, so a refused command leaves no trace.
    created: bool,
    writing: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self._lock.is_some() && self.writing {
            // The run is over: nobody holds it any more.
            let _ = std::fs::remove_file(self.path.join(HOLDER));
        }
        if self.created && !self.writing {
            // Fails (harmlessly) unless the directory is still empty.
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

impl RunDir {
    /// Creates the directory if needed and takes its lock (rank 0 only). Fails,
    /// naming the holder, when another process has it.
    pub fn lock(path: &Path, rank0: bool) -> Result<RunDir> {
        if !rank0 {
            return Ok(RunDir {
                path: path.to_path_buf(),
                _lock: None,
                created: false,
                writing: false,
            });
        }
        match RunDir::try_lock(path)? {
            Some(dir) => Ok(dir),
            None => {
                let holder = std::fs::read_to_string(path.join(HOLDER))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .map(|h| {
                        format!(
                            "pid {} on host {}",
                            h["pid"],
                            h["host"].as_str().unwrap_or("?")
                        )
                    })
                    .unwrap_or_else(|| "another process (still starting)".into());
                bail!(
                    "run directory {} is in use by {holder}: wait for that run to end, or set \
                     another `name` (nothing was written)",
                    path.display()
                );
            }
        }
    }

    /// [`RunDir::lock`] for rank 0, `None` when another process holds the
    /// directory (the lock is the kernel's: it goes with its holder, however
    /// that process ends).
    pub fn try_lock(path: &Path) -> Result<Option<RunDir>> {
        let created = !path.exists();
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        let dir = File::open(path)
            .with_context(|| format!("cannot open run directory {}", path.display()))?;
        let mut run_dir = RunDir {
            path: path.to_path_buf(),
            _lock: None,
            created,
            writing: false,
        };
        match dir.try_lock() {
            Ok(()) => {
                run_dir._lock = Some(dir);
                Ok(Some(run_dir))
            }
            // Dropping `run_dir` removes the directory if this call made it.
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock run directory {}", path.display()))
            }
        }
    }

    /// Every check has passed: from now on the run writes into the directory.
    pub fn begin_writing(&mut self) {
        self.writing = true;
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Checks that the directory fits the request: `--resume` needs a
    /// checkpoint, a new run needs a directory without a run in it. Writes
    /// nothing.
    pub fn check_start(&self, resume: bool) -> Result<()> {
        let has_checkpoint = self.file(CHECKPOINT).exists();
        if resume && !has_checkpoint {
            if self.file(RESULTS).exists() {
                bail!(
                    "--resume: {} holds a finished run (results.json) and no checkpoint: there \
                     is nothing to resume",
                    self.path.display()
                );
            }
            bail!(
                "--resume: {} holds no checkpoint to resume from (train.checkpoint was false, or \
                 no epoch finished): start it again without --resume",
                self.path.display()
            );
        }
        if !resume && (has_checkpoint || self.file(RESULTS).exists()) {
            bail!(
                "{} already holds a run: use --resume to continue it, or set another `name` / \
                 `output_dir` (nothing was overwritten)",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Compares `cfg` with the run's saved configuration: any difference
    /// outside [`SCHEDULE_KEYS`] is refused unless `force`. Returns the keys
    /// that differ. Writes nothing.
    pub fn check_resume_config(&self, cfg: &Config, force: bool) -> Result<Vec<String>> {
        let saved_path = self.file(RESOLVED);
        let saved = std::fs::read_to_string(&saved_path)
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|text| Ok(serde_yaml::from_str::<Config>(&text)?))
            .with_context(|| {
                format!(
                    "--resume: cannot read the run's saved configuration {}; resume with \
                     --force-config to take the given config as it is",
                    saved_path.display()
                )
            });
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) if force => {
                tracing::warn!("{e:#}; --force-config: using the given config");
                return Ok(vec![]);
            }
            Err(e) => return Err(e),
        };
        let changes = differences(&saved, cfg)?;
        let refused: Vec<&String> = changes
            .iter()
            .filter(|c| {
                !SCHEDULE_KEYS
                    .iter()
                    .any(|k| c.starts_with(&format!("{k}:")))
            })
            .collect();
        if !refused.is_empty() && !force {
            return Err(config_error(format!(
                "--resume: the config differs from the run's saved {} in: {}. A resumed run \
                 must be the same experiment; only {} may change. Resume with the saved \
                 settings, start a new run with another `name`, or pass --force-config to \
                 resume with the new settings anyway (nothing was written)",
                saved_path.display(),
                refused
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                SCHEDULE_KEYS.join(", ")
            )));
        }
        Ok(changes)
    }

    /// Removes what a dead run without a checkpoint left behind, so that a new
    /// run starts its files fresh.
    pub fn clear_dead_run(&self) -> Result<()> {
        for name in [
            METRICS,
            BEST,
            RESOLVED,
            CONFIG_HASH,
            HOLDER,
            crate::user_ranks::FILE,
        ] {
            let path = self.file(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {} of a dead run", path.display()))?;
            }
        }
        // Temporary files of interrupted atomic writes.
        for entry in std::fs::read_dir(&self.path)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).ok();
            }
        }
        Ok(())
    }

    /// Drops the `metrics.jsonl` lines of epochs after `epoch`, the last one
    /// the checkpoint holds: a run killed between logging an epoch and saving
    /// its checkpoint redoes that epoch, and its line must not appear twice.
    pub fn trim_metrics(&self, epoch: usize) -> Result<()> {
        let path = self.file(METRICS);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["epoch"].as_u64())
                    .is_some_and(|e| e as usize <= epoch)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        if kept != text {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Records who holds the lock.
    pub fn write_holder(&self) -> Result<()> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let holder = json!({"pid": std::process::id(), "host": host, "since_unix": since});
        write_atomic(&self.file(HOLDER), holder.to_string().as_bytes())
    }
}

/// A hash of everything in `cfg` that decides a run's numbers: every key but
/// the location keys (`name`, `output_dir`), so that a run keeps its hash
/// wherever its directory is. Stored as [`CONFIG_HASH`] in the run directory.
pub fn config_hash(cfg: &Config) -> Result<String> {
    let mut flat = flatten(cfg)?;
    flat.retain(|k, _| !LOCATION_KEYS.contains(&k.as_str()));
    Ok(llm_esr_prep::fsutil::sha256_bytes(
        serde_json::to_string(&flat)?.as_bytes(),
    ))
}

/// `key: old -> new` for every leaf that differs between two configs, the
/// location keys excepted.
pub fn differences(saved: &Config, new: &Config) -> Result<Vec<String>> {
    let (a, b) = (flatten(saved)?, flatten(new)?);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
    Ok(keys
        .into_iter()
        .filter(|k| !LOCATION_KEYS.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k))))
        .collect())
}

/// A config as dotted keys and their values in YAML flow style.
fn flatten(cfg: &Config) -> Result<BTreeMap<String, String>> {
    fn walk(prefix: &str, v: &serde_yaml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_yaml::Value::Mapping(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = match k {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap_or_default(),
                    };
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            leaf => {
                let text = serde_json::to_string(leaf).unwrap_or_default();
                out.insert(prefix.to_string(), text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &serde_yaml::to_value(cfg)?, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_normal_component() {
        for bad in ["", ".", "..", "a/b", "../x", "a\\b", "tab\there", "nl\n"] {
            assert!(name_problem(bad).is_some(), "{bad:?} accepted");
        }
        for good in ["run", "beauty5_sasrec", "a.b", "..x", "seed-42"] {
            assert_eq!(name_problem(good), None, "{good:?} refused");
        }
    }

    #[test]
    fn differences_name_the_changed_keys_only() -> Result<()> {
        let a = Config::default();
        let mut b = a.clone();
        b.train.lr = 0.01;
        b.train.epochs = 7;
        b.name = "other".into();
        let d = differences(&a, &b)?;
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("train.epochs: 200 -> 7"), "{d:?}");
        assert!(d[1].starts_with("train.lr: 0.001 -> 0.01"), "{d:?}");
        Ok(())
    }
}
