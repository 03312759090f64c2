//! The shared queue of a sweep directory: which run to train next.
//!
//! The state of a run is its directory: `results.json` = finished,
//! `failed.txt` = failed (the error), locked = being trained by some process
//! (the run directory's kernel lock, which ends with its holder however it
//! ends), otherwise still to do (a checkpoint means: resume it). Claims are
//! made under `queue.lock` in the sweep directory, so the groups of one
//! `mpirun`, and the jobs of a Slurm array sharing the directory, never take
//! the same run. Runs are taken in plan order; a run left by a dead process
//! is taken again by the next claim.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::plan::Planned;
use crate::run_dir::RunDir;
use crate::train::RESULTS;

/// A failed run's error, in its directory.
pub const FAILED: &str = "failed.txt";
/// The claim lock, in the sweep directory.
const QUEUE_LOCK: &str = "queue.lock";

pub struct Queue {
    dir: PathBuf,
}

/// Counts of the runs of a plan, as the directories say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub done: usize,
    pub failed: usize,
    pub left: usize,
}

impl Queue {
    /// The queue of the sweep directory `dir` (created if needed).
    pub fn new(dir: &Path) -> Result<Queue> {
        std::fs::create_dir_all(dir.join("runs"))
            .with_context(|| format!("cannot create sweep directory {}", dir.display()))?;
        Ok(Queue {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory of run `name`.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.dir.join("runs").join(name)
    }

    pub fn is_done(&self, name: &str) -> bool {
        self.run_dir(name).join(RESULTS).is_file()
    }

    pub fn has_failed(&self, name: &str) -> bool {
        self.run_dir(name).join(FAILED).is_file()
    }

    /// The first run of `planned` that is neither finished, failed (unless
    /// `retry_failed`) nor held by another process, with its directory
    /// locked for the caller; `None` when nothing is left to take.
    pub fn claim(
        &self,
        planned: &[Planned],
        retry_failed: bool,
    ) -> Result<Option<(usize, RunDir)>> {
        let lock_path = self.dir.join(QUEUE_LOCK);
        let lock = File::create(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        for (i, p) in planned.iter().enumerate() {
            if self.is_done(&p.name) || (self.has_failed(&p.name) && !retry_failed) {
                continue;
            }
            if let Some(run_dir) = RunDir::try_lock(&self.run_dir(&p.name))? {
                let failed = run_dir.file(FAILED);
                if failed.exists() {
                    std::fs::remove_file(&failed)
                        .with_context(|| format!("cannot remove {}", failed.display()))?;
                }
                return Ok(Some((i, run_dir)));
            }
        }
        Ok(None)
    }

    /// Records that run `name` failed with `error` (its directory stays, so
    /// that a checkpoint can still be resumed with `--retry-failed`).
    pub fn record_failure(&self, name: &str, error: &str) -> Result<()> {
        let dir = self.run_dir(name);
        std::fs::create_dir_all(&dir)?;
        crate::files::write_atomic(&dir.join(FAILED), format!("{error}\n").as_bytes())
    }

    pub fn tally(&self, planned: &[Planned]) -> Tally {
        let mut t = Tally::default();
        for p in planned {
            if self.is_done(&p.name) {
                t.done += 1;
            } else if self.has_failed(&p.name) {
                t.failed += 1;
            } else {
                t.left += 1;
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(names: &[&str]) -> Vec<Planned> {
        names
            .iter()
            .map(|n| Planned {
                name: n.to_string(),
                group: n.to_string(),
                seed: None,
                params: Default::default(),
                overrides: vec![],
            })
            .collect()
    }

    #[test]
    fn claims_skip_finished_failed_and_held_runs() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let q = Queue::new(tmp.path())?;
        let plan = planned(&["a", "b", "c", "d"]);
        std::fs::create_dir_all(q.run_dir("a"))?;
        std::fs::write(q.run_dir("a").join(RESULTS), "{}")?;
        q.record_failure("b", "boom")?;
        let (i, held) = q.claim(&plan, false)?.unwrap();
        assert_eq!(i, 2, "a is done, b failed");
        // c is held (by this claim): the next claim takes d, then nothing.
        let (j, held_d) = q.claim(&plan, false)?.unwrap();
        assert_eq!(j, 3);
        assert!(q.claim(&plan, false)?.is_none());
        assert_eq!(
            q.tally(&plan),
            Tally {
                done: 1,
                failed: 1,
                left: 2
            }
        );
        drop(held);
        assert_eq!(
            q.claim(&plan, false)?.unwrap().0,
            2,
            "a released run is taken again"
        );
        drop(held_d);
        // --retry-failed takes b and clears its failure.
        let (k, _b) = q.claim(&plan, true)?.unwrap();
        assert_eq!(k, 1);
        assert!(!q.has_failed("b"));
        Ok(())
    }
}
