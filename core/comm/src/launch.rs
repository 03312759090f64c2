//! What the environment says about how this process was started.
//!
//! Every detection function here is pure over a variable lookup (see
//! [`detect_launch_from`]) so that tests do not mutate the process environment.

use crate::error::{CommError, CommErrorKind};

/// How a launcher started this process, read from its environment variables.
///
/// Informational: the authoritative rank and size come from the communicator
/// ([`crate::Communicator`]). This only decides whether MPI is initialised under
/// [`crate::Backend::Auto`] and lets [`crate::init`] notice a binary built against
/// one MPI but started by another MPI's launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Who started us, for messages: `"mpirun (Open MPI)"`, `"srun (Slurm)"`, ...
    pub launcher: &'static str,
    /// The variable the world size (or, if there is none, the rank) was read from.
    pub size_var: &'static str,
    /// Number of ranks the launcher started, when it says so.
    pub world_size: Option<usize>,
    /// This process's rank as the launcher numbered it.
    pub rank: Option<usize>,
    /// This process's rank among the ranks on its node.
    pub local_rank: Option<usize>,
}

impl Launch {
    /// `"mpirun (Open MPI), OMPI_COMM_WORLD_SIZE=4"`: for log lines and errors.
    pub fn describe(&self) -> String {
        match self.world_size {
            Some(n) => format!("{}, {}={n}", self.launcher, self.size_var),
            None => format!(
                "{} ({} set, world size not given)",
                self.launcher, self.size_var
            ),
        }
    }
}

/// One launcher's variables, checked in order. `trigger` decides whether the
/// launcher is present; size, rank and local rank are read if they parse.
struct Scheme {
    launcher: &'static str,
    trigger: &'static str,
    size: Option<&'static str>,
    rank: &'static str,
    local: &'static [&'static str],
}

/// Order matters: launchers that run under Slurm (mpirun starts its daemons
/// with srun; Hydra may too) leave `SLURM_*` step variables of *another* step in
/// the environment, so the MPI launchers' own variables win. `SLURM_NTASKS` is
/// never used: sbatch sets it in the batch script, where no ranks were started.
const SCHEMES: &[Scheme] = &[
    Scheme {
        launcher: "mpirun (Open MPI)",
        trigger: "OMPI_COMM_WORLD_SIZE",
        size: Some("OMPI_COMM_WORLD_SIZE"),
        rank: "OMPI_COMM_WORLD_RANK",
        local: &["OMPI_COMM_WORLD_LOCAL_RANK"],
    },
    Scheme {
        launcher: "mpirun_rsh (MVAPICH2)",
        trigger: "MV2_COMM_WORLD_SIZE",
        size: Some("MV2_COMM_WORLD_SIZE"),
        rank: "MV2_COMM_WORLD_RANK",
        local: &["MV2_COMM_WORLD_LOCAL_RANK"],
    },
    Scheme {
        launcher: "PMI (MPICH/Intel MPI Hydra, srun --mpi=pmi2)",
        trigger: "PMI_SIZE",
        size: Some("PMI_SIZE"),
        rank: "PMI_RANK",
        local: &["MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"],
    },
    Scheme {
        launcher: "srun (Slurm)",
        trigger: "SLURM_STEP_NUM_TASKS",
        size: Some("SLURM_STEP_NUM_TASKS"),
        rank: "SLURM_PROCID",
        local: &["SLURM_LOCALID"],
    },
    Scheme {
        launcher: "PMIx",
        trigger: "PMIX_RANK",
        size: None,
        rank: "PMIX_RANK",
        local: &["PMIX_LOCAL_RANK"],
    },
];

/// Reads the launcher from the process environment; `None` when the process
/// was not started by a known MPI launcher (or by `srun`).
pub fn detect_launch() -> Option<Launch> {
    detect_launch_from(|name| std::env::var(name).ok())
}

/// [`detect_launch`] over any variable lookup (a map in tests).
pub fn detect_launch_from(get: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |name: &str| get(name).and_then(|v| v.trim().parse::<usize>().ok());
    SCHEMES.iter().find_map(|s| {
        get(s.trigger)?;
        Some(Launch {
            launcher: s.launcher,
            size_var: s.size.unwrap_or(s.trigger),
            world_size: s.size.and_then(num),
            rank: num(s.rank),
            local_rank: s.local.iter().find_map(|v| num(v)),
        })
    })
}

/// Compares what the launcher said with what MPI reports after `MPI_Init`.
///
/// A binary linked against MPI "A" but started by MPI "B"'s launcher does not
/// see B's wiring: `MPI_Init` comes up as a singleton (size 1) in every process
/// and each would silently train alone. That is refused here, with a message
/// that names both numbers, the variable and the MPI library in use.
pub fn check_world(
    launch: Option<&Launch>,
    mpi_size: usize,
    mpi_rank: usize,
    mpi_library: &str,
) -> Result<(), CommError> {
    let Some(l) = launch else { return Ok(()) };
    let size_mismatch = l.world_size.is_some_and(|n| n != mpi_size);
    let rank_mismatch = l.rank.is_some_and(|r| r != mpi_rank);
    if !size_mismatch && !rank_mismatch {
        return Ok(());
    }
    let said = match (l.world_size, l.rank) {
        (Some(n), Some(r)) => format!("{n} ranks ({}={n}), this one rank {r}", l.size_var),
        (Some(n), None) => format!("{n} ranks ({}={n})", l.size_var),
        (None, Some(r)) => format!("this process as rank {r} ({}={r})", l.size_var),
        (None, None) => unreachable!("a mismatch needs a size or a rank"),
    };
    let library = mpi_library
        .lines()
        .next()
        .unwrap_or_default()
        .trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let library = if library.is_empty() {
        "unknown"
    } else {
        library
    };
    let slurm_hint = if l.launcher.starts_with("srun") {
        " Under Slurm, srun must start the ranks through a PMI plugin that this MPI \
         understands (e.g. `srun --mpi=pmix`; see `srun --mpi=list`), or use this MPI's mpirun \
         inside the allocation."
    } else {
        ""
    };
    Err(CommError::new(
        CommErrorKind::LaunchMismatch,
        format!(
            "MPI launch mismatch: the launcher {} started {said}, but MPI_Init in this \
             process reports MPI_Comm_size = {mpi_size} and rank {mpi_rank}. The binary is \
             linked against an MPI library ({library}) that is not the one whose launcher \
             started it, so every process would train alone. Rebuild against the cluster's \
             MPI (load its module, then `MPICC=$(which mpicc) cargo build --release`; \
             `mpicc -show` must point at that MPI) or start the binary with the mpirun of \
             the MPI it was built against.{slurm_hint}",
            l.launcher
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn nothing_set_is_no_launcher() {
        assert_eq!(detect_launch_from(env(&[])), None);
    }

    #[test]
    fn sbatch_without_srun_is_no_launcher() {
        // What a batch script sees: SLURM_NTASKS and friends, but no step variables.
        let l = detect_launch_from(env(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NPROCS", "8"),
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
        ]));
        assert_eq!(l, None);
    }

    #[test]
    fn open_mpi() {
        let l = detect_launch_from(env(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("PMIX_RANK", "3"),
        ]))
        .unwrap();
        assert_eq!(l.launcher, "mpirun (Open MPI)");
        assert_eq!(l.size_var, "OMPI_COMM_WORLD_SIZE");
        assert_eq!(
            (l.world_size, l.rank, l.local_rank),
            (Some(4), Some(3), Some(1))
        );
        assert_eq!(l.describe(), "mpirun (Open MPI), OMPI_COMM_WORLD_SIZE=4");
    }

    #[test]
    fn open_mpi_under_slurm_wins_over_the_daemon_step() {
        // mpirun inside sbatch starts its daemons with srun: the ranks inherit
        // that step's SLURM_STEP_NUM_TASKS (one per node), which must not count.
        let l = detect_launch_from(env(&[
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "0"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_RANK", "5"),
        ]))
        .unwrap();
        assert_eq!((l.world_size, l.rank), (Some(8), Some(5)));
        assert_eq!(l.local_rank, None);
    }

    #[test]
    fn hydra_pmi() {
        let l = detect_launch_from(env(&[
            ("PMI_SIZE", "2"),
            ("PMI_RANK", "1"),
            ("MPI_LOCALRANKID", "1"),
        ]))
        .unwrap();
        assert_eq!(l.size_var, "PMI_SIZE");
        assert_eq!(
            (l.world_size, l.rank, l.local_rank),
            (Some(2), Some(1), Some(1))
        );
    }

    #[test]
    fn srun_step() {
        let l = detect_launch_from(env(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_PROCID", "2"),
            ("SLURM_LOCALID", "0"),
            ("PMIX_RANK", "2"),
        ]))
        .unwrap();
        assert_eq!(l.launcher, "srun (Slurm)");
        assert_eq!(
            (l.world_size, l.rank, l.local_rank),
            (Some(4), Some(2), Some(0))
        );
    }

    #[test]
    fn bare_pmix_has_no_size() {
        let l = detect_launch_from(env(&[("PMIX_RANK", "0")])).unwrap();
        assert_eq!(l.launcher, "PMIx");
        assert_eq!((l.world_size, l.rank), (None, Some(0)));
        assert!(l.describe().contains("world size not given"));
    }

    #[test]
    fn unparsable_values_are_unknown_not_absent() {
        let l = detect_launch_from(env(&[("OMPI_COMM_WORLD_SIZE", "lots")])).unwrap();
        assert_eq!((l.world_size, l.rank), (None, None));
    }

    #[test]
    fn check_world_accepts_agreement_and_no_launcher() {
        assert!(check_world(None, 1, 0, "Open MPI v4.1.4").is_ok());
        let l = Launch {
            launcher: "mpirun (Open MPI)",
            size_var: "OMPI_COMM_WORLD_SIZE",
            world_size: Some(2),
            rank: Some(1),
            local_rank: Some(1),
        };
        assert!(check_world(Some(&l), 2, 1, "x").is_ok());
    }

    #[test]
    fn check_world_names_both_numbers_and_the_variable() {
        let l = Launch {
            launcher: "mpirun (Open MPI)",
            size_var: "OMPI_COMM_WORLD_SIZE",
            world_size: Some(2),
            rank: Some(1),
            local_rank: None,
        };
        let e =
            check_world(Some(&l), 1, 0, "MPICH Version: 4.0\nMPICH Release date: x").unwrap_err();
        assert_eq!(e.kind(), CommErrorKind::LaunchMismatch);
        let m = e.to_string();
        assert!(m.contains("OMPI_COMM_WORLD_SIZE=2"), "{m}");
        assert!(m.contains("MPI_Comm_size = 1"), "{m}");
        assert!(m.contains("MPICH Version: 4.0"), "{m}");
        assert!(!m.contains("Release date"), "{m}");
        assert!(m.contains("MPICC"), "{m}");
        assert!(m.contains("mpirun"), "{m}");
    }

    #[test]
    fn check_world_catches_rank_only_mismatch_and_hints_srun() {
        let l = Launch {
            launcher: "srun (Slurm)",
            size_var: "SLURM_STEP_NUM_TASKS",
            world_size: None,
            rank: Some(3),
            local_rank: None,
        };
        let m = check_world(Some(&l), 1, 0, "Open MPI")
            .unwrap_err()
            .to_string();
        assert!(m.contains("rank 3"), "{m}");
        assert!(m.contains("--mpi=pmix"), "{m}");
    }
}
