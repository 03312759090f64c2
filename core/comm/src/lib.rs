//! Communicator for data-parallel training in llm-esr-orch.
//!
//! This crate gives the trainer one [`Communicator`] trait (rank, world size,
//! node-local rank, sum all-reduce of flat `f32`/`f64` host buffers, broadcast
//! of `f32` buffers and of byte strings, barrier, split) with three backends:
//! [`SingleProcess`] (one rank, every collective is the identity),
//! [`MpiComm`] (rsmpi over the MPI library found at build time; Open MPI in CI,
//! tested with `mpirun -np 2` through the `comm-selftest` binary) and, behind
//! the `nccl` cargo feature, `NcclComm` (cudarc's NCCL bindings, bootstrapped
//! over MPI; compiled but never run here, as no GPU was available). [`init`]
//! picks the backend from a [`Backend`] and from what the launcher put in the
//! environment ([`detect_launch`]), and refuses a binary built against one MPI
//! but started by another MPI's launcher.
//!
//! What it is not: it knows nothing about tensors or candle (it must not depend
//! on candle; the trainer hands it the memory of its flat gradient tensor: a
//! host slice on the CPU, a cudarc slice through `Communicator::as_nccl` on a
//! GPU); it has no
//! point-to-point messages, no non-blocking collectives and no bucketing (the
//! trainer decides the buckets); and it does not start processes: `mpirun`,
//! `srun` or the scripts in `cluster/` do.
//!
//! Every rank of a communicator must make the same collective calls in the
//! same order with buffers of equal length; a rank that fails alone should call
//! [`Communicator::abort`] so that the others do not wait for it forever (see
//! the [`MpiComm`] documentation for who owns and finalises MPI).

mod error;
mod launch;
mod mpi_comm;
#[cfg(feature = "nccl")]
mod nccl_comm;
mod single;
mod unique_id;

use std::fmt;
use std::str::FromStr;

pub use error::{CommError, CommErrorKind};
pub use launch::{check_world, detect_launch, detect_launch_from, Launch};
pub use mpi_comm::MpiComm;
#[cfg(feature = "nccl")]
pub use nccl_comm::NcclComm;
pub use single::SingleProcess;
pub use unique_id::{share_unique_id, UNIQUE_ID_BYTES};

/// A group of ranks that run collectives together.
///
/// Collectives block until every rank of the communicator has called them.
/// Buffers are plain host memory; reductions are sums (divide by [`size`] to
/// average). Errors are returned for bad arguments and set-up failures; a
/// failing network usually ends the job through the launcher instead.
///
/// [`size`]: Communicator::size
pub trait Communicator: Send {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Rank among the ranks of this communicator on the same node
    /// (`MPI_Comm_split_type(SHARED)` for MPI; 0 for a single process). The
    /// NCCL backend uses it as the GPU ordinal.
    fn local_rank(&self) -> usize;
    /// `"single"`, `"mpi"` or `"nccl"`.
    fn backend(&self) -> &'static str;
    /// Sums `buf` element-wise over all ranks; every rank gets the sum.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// [`all_reduce_sum`](Communicator::all_reduce_sum) for `f64` (metrics, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError>;
    /// Copies `root`'s `buf` into every rank's `buf` (all of the same length).
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Copies `root`'s bytes to every rank; the length is sent first, so the
    /// other ranks' vectors may have any length (they are resized).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
    /// Splits into disjoint communicators, one per `color`; ranks in each are
    /// ordered by `key`, ties by their rank here. Collective. Color and key
    /// must be at most `i32::MAX`.
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>, CommError>;

    /// `rank() == 0`: the rank that writes files and reports progress.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The NCCL communicator itself, when this is one: the trainer sums GPU
    /// tensors with it where they are ([`NcclComm::all_reduce_sum_device`]).
    #[cfg(feature = "nccl")]
    fn as_nccl(&self) -> Option<&NcclComm> {
        None
    }

    /// Ends the whole job with exit code `code`, from any rank, without
    /// waiting for the others (`MPI_Abort` on `MPI_COMM_WORLD`). Use it on an
    /// error that other ranks may not share: returning and dropping the
    /// communicator would wait in `MPI_Finalize` for ranks that are waiting in
    /// a collective for this one. A single process just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Which device a rank uses: its node-local rank, or 0 when the launcher made
/// only one device visible to each rank (`CUDA_VISIBLE_DEVICES` per task).
pub fn pick_device(local_rank: usize, visible: usize) -> Result<usize, CommError> {
    match visible {
        0 => Err(CommError::unavailable(
            "no GPU for this rank: CUDA reports no visible device (check CUDA_VISIBLE_DEVICES and the job's GPU request)",
        )),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(CommError::invalid(format!(
            "node-local rank {local_rank} has no GPU of its own: {n} devices are visible. \
             Start at most one rank per GPU on each node (e.g. --ntasks-per-node={n})"
        ))),
    }
}

/// Which communicator [`init`] builds (`distributed.backend` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// MPI when a launcher started the process ([`detect_launch`]), otherwise
    /// a single process. Never NCCL: ask for it explicitly.
    #[default]
    Auto,
    /// One process, no MPI. Refused when a launcher started several ranks.
    Single,
    /// MPI, also without a launcher (a one-rank "singleton" run).
    Mpi,
    /// NCCL on the GPU of each rank, bootstrapped over MPI (feature `nccl`).
    Nccl,
}

impl Backend {
    /// All names, as written in configs.
    pub const NAMES: [&'static str; 4] = ["auto", "single", "mpi", "nccl"];

    /// Parses `auto`, `single`, `mpi` or `nccl` (ASCII case-insensitive).
    pub fn parse(s: &str) -> Result<Backend, CommError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "single" => Ok(Backend::Single),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            other => Err(CommError::invalid(format!(
                "unknown communicator backend `{other}`: expected one of auto, single, mpi, nccl"
            ))),
        }
    }

    /// The config name (`"auto"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Single => "single",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }
}

impl FromStr for Backend {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::parse(s)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Builds the communicator for this process: `backend` resolved against the
/// launcher found in the environment (see [`init_with_launch`]).
///
/// Call it once per process and keep the result for the whole run: MPI is
/// finalised when the last communicator made from it is dropped, and cannot be
/// initialised again.
pub fn init(backend: Backend) -> Result<Box<dyn Communicator>, CommError> {
    init_with_launch(backend, detect_launch().as_ref())
}

/// [`init`] with the launcher given instead of read from the environment.
pub fn init_with_launch(
    backend: Backend,
    launch: Option<&Launch>,
) -> Result<Box<dyn Communicator>, CommError> {
    Ok(match resolve(backend, launch)? {
        Backend::Single => Box::new(SingleProcess::new()),
        Backend::Mpi => Box::new(MpiComm::init(launch)?),
        #[cfg(feature = "nccl")]
        Backend::Nccl => Box::new(NcclComm::init(launch)?),
        other => unreachable!("resolve never returns {other}"),
    })
}

/// Decides the concrete backend (never `Auto`) without initialising anything.
pub fn resolve(backend: Backend, launch: Option<&Launch>) -> Result<Backend, CommError> {
    match backend {
        Backend::Auto => Ok(if launch.is_some() {
            Backend::Mpi
        } else {
            Backend::Single
        }),
        Backend::Single => match launch {
            Some(l) if l.world_size.unwrap_or(1) > 1 || l.rank.unwrap_or(0) > 0 => {
                Err(CommError::invalid(format!(
                    "backend `single` was asked for, but the launcher started several ranks \
                     ({}): each would train alone and overwrite the others' files. Use \
                     distributed.backend auto or mpi, or start one process without mpirun/srun",
                    l.describe()
                )))
            }
            _ => Ok(Backend::Single),
        },
        Backend::Mpi => Ok(Backend::Mpi),
        Backend::Nccl if cfg!(feature = "nccl") => Ok(Backend::Nccl),
        Backend::Nccl => Err(CommError::unavailable(
            "backend `nccl` needs a build with CUDA: rebuild on a node with the CUDA toolkit \
             with `cargo build --release --features cuda` (llm-esr-comm feature `nccl`), or \
             use distributed.backend mpi",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(size: Option<usize>, rank: Option<usize>) -> Launch {
        Launch {
            launcher: "mpirun (Open MPI)",
            size_var: "OMPI_COMM_WORLD_SIZE",
            world_size: size,
            rank,
            local_rank: None,
        }
    }

    #[test]
    fn backend_names_round_trip() {
        for name in Backend::NAMES {
            let b = Backend::parse(name).unwrap();
            assert_eq!(b.name(), name);
            assert_eq!(b.to_string(), name);
            assert_eq!(name.parse::<Backend>().unwrap(), b);
        }
        assert_eq!(Backend::parse(" MPI ").unwrap(), Backend::Mpi);
        assert_eq!(Backend::default(), Backend::Auto);
        let e = Backend::parse("gloo").unwrap_err();
        assert_eq!(e.kind(), CommErrorKind::InvalidArgument);
        assert!(e.to_string().contains("auto, single, mpi, nccl"), "{e}");
    }

    #[test]
    fn backend_serde_is_lowercase() {
        let b: Backend = serde_json::from_str("\"nccl\"").unwrap();
        assert_eq!(b, Backend::Nccl);
        assert_eq!(
            serde_json::to_string(&Backend::Single).unwrap(),
            "\"single\""
        );
        assert!(serde_json::from_str::<Backend>("\"Mpi\"").is_err());
    }

    #[test]
    fn auto_follows_the_launcher() {
        assert_eq!(resolve(Backend::Auto, None).unwrap(), Backend::Single);
        let l = launch(Some(1), Some(0));
        assert_eq!(resolve(Backend::Auto, Some(&l)).unwrap(), Backend::Mpi);
    }

    #[test]
    fn single_under_a_multi_rank_launcher_is_refused() {
        let l = launch(Some(4), Some(0));
        let e = resolve(Backend::Single, Some(&l)).unwrap_err();
        assert!(e.to_string().contains("OMPI_COMM_WORLD_SIZE=4"), "{e}");
        let l = launch(None, Some(2));
        assert!(resolve(Backend::Single, Some(&l)).is_err());
        let l = launch(Some(1), Some(0));
        assert_eq!(resolve(Backend::Single, Some(&l)).unwrap(), Backend::Single);
    }

    #[test]
    fn mpi_without_launcher_is_legal() {
        assert_eq!(resolve(Backend::Mpi, None).unwrap(), Backend::Mpi);
    }

    #[test]
    fn nccl_needs_the_feature() {
        let r = resolve(Backend::Nccl, None);
        if cfg!(feature = "nccl") {
            assert_eq!(r.unwrap(), Backend::Nccl);
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), CommErrorKind::Unavailable);
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn init_single_without_launcher() {
        let c = init_with_launch(Backend::Single, None).unwrap();
        assert_eq!((c.rank(), c.size(), c.backend()), (0, 1, "single"));
    }

    #[test]
    fn device_choice() {
        assert_eq!(pick_device(3, 1).unwrap(), 0);
        assert_eq!(pick_device(1, 4).unwrap(), 1);
        let e = pick_device(4, 4).unwrap_err().to_string();
        assert!(e.contains("ntasks-per-node=4"), "{e}");
        assert!(pick_device(0, 0).is_err());
    }

    #[test]
    fn communicator_is_send() {
        fn send<T: Send + ?Sized>() {}
        send::<dyn Communicator>();
        send::<MpiComm>();
        send::<Box<dyn Communicator>>();
    }
}
