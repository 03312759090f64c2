//! The MPI backend (rsmpi over the system's MPI, Open MPI in CI).
//!
//! # Who owns MPI
//!
//! [`MpiComm::init`] calls `MPI_Init_thread` and wraps rsmpi's `Universe` in a
//! reference-counted guard. Every `MpiComm` (the world communicator and all
//! communicators made from it with `split`) holds a clone of that guard, and
//! frees its own `MPI_Comm` before releasing it. `MPI_Finalize` runs when the
//! last communicator is dropped, so: keep the communicator alive for the whole
//! run and let it drop before the process exits (return from `main`; do not
//! call `std::process::exit` with a communicator alive, or Open MPI's mpirun
//! reports that a rank exited without finalising).
//!
//! MPI cannot be initialised twice in one process: a second [`crate::init`]
//! (while the first communicator lives, or after it was dropped) is an error.
//!
//! # Failure on one rank
//!
//! `MPI_Finalize` waits for the other ranks, and the other ranks may be waiting
//! in a collective for the one that failed: dropping the communicator on an
//! error path of one rank can hang the job. Therefore:
//! - if the communicator is dropped while the thread panics, the guard calls
//!   `MPI_Abort` (when more than one rank runs) instead of finalising;
//! - on an error that only some ranks may see, call
//!   [`Communicator::abort`](crate::Communicator::abort): the launcher then ends
//!   every rank and the job exits non-zero.
//!
//! # Threads
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED` requested. Every MPI call of
//! this crate holds one process-wide lock, so communicators can be moved to
//! other threads. If the library only grants `MPI_THREAD_FUNNELED` (or less),
//! calls from a thread other than the one that called `init` return an error.
//! Two threads must not run collectives on different communicators of the same
//! process at the same time (they would take the lock in different orders on
//! different ranks).

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

use crate::error::{check_root, CommError, CommErrorKind};
use crate::launch::{check_world, Launch};
use crate::Communicator;

/// Elements per MPI call. MPI counts are C ints; chunking also bounds the
/// scratch copy that the all-reduce needs (see [`MpiComm`]).
const CHUNK: usize = 1 << 23;

static MPI_LOCK: Mutex<()> = Mutex::new(());

fn mpi_lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Owns the MPI library state; see the module documentation.
struct MpiEnv {
    universe: Option<Universe>,
    world_size: usize,
    /// Set when MPI granted less than `MPI_THREAD_SERIALIZED`: the only thread
    /// that may call MPI.
    only_thread: Option<ThreadId>,
    library: String,
}

impl Drop for MpiEnv {
    fn drop(&mut self) {
        let _lock = mpi_lock();
        if std::thread::panicking() && self.world_size > 1 {
            eprintln!(
                "llm-esr-comm: this rank panicked while MPI was active; calling MPI_Abort so \
                 that the other ranks do not wait for it forever"
            );
            SimpleCommunicator::world().abort(1);
        }
        // rsmpi's Universe::drop calls MPI_Finalize.
        drop(self.universe.take());
    }
}

/// An MPI communicator (the world, or a part of it made by `split`).
///
/// `all_reduce_sum` copies each chunk of the buffer (at most 2^23 elements)
/// into a scratch buffer that is kept between calls and reduces from it into
/// the caller's buffer: rsmpi has no safe `MPI_IN_PLACE`, and the copy is
/// cheap next to the network transfer.
///
/// Every rank of the communicator must make the same sequence of collective
/// calls with buffers of equal length.
pub struct MpiComm {
    // Dropped by hand in `Drop` (under the lock, before `env` goes).
    comm: ManuallyDrop<SimpleCommunicator>,
    rank: usize,
    size: usize,
    local_rank: usize,
    scratch_f32: RefCell<Vec<f32>>,
    scratch_f64: RefCell<Vec<f64>>,
    env: Arc<MpiEnv>,
}

// SAFETY: rsmpi's communicator handle holds a raw `MPI_Comm` (a pointer in
// Open MPI), which makes it `!Send`. Moving the handle between threads is
// allowed by MPI as long as calls are serialised: every MPI call of this type
// holds `MPI_LOCK`, and `enter` refuses other threads when MPI only granted
// FUNNELED. The type stays `!Sync` (RefCell), so one thread at a time uses it.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialises MPI and returns the world communicator.
    ///
    /// `launch` is what the environment said (see [`crate::detect_launch`]); if
    /// it disagrees with the MPI world, MPI is finalised again and a
    /// [`CommErrorKind::LaunchMismatch`] error is returned. `None` is a legal
    /// single-rank run without a launcher (an MPI "singleton").
    pub fn init(launch: Option<&Launch>) -> Result<MpiComm, CommError> {
        let world = {
            let _lock = mpi_lock();
            if mpi::environment::is_finalized() {
                return Err(CommError::new(
                    CommErrorKind::AlreadyInitialized,
                    "MPI was already finalised in this process (the communicator of an earlier \
                     init was dropped); MPI cannot be started twice, so keep the first \
                     communicator for the whole run",
                ));
            }
            let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
            else {
                return Err(CommError::new(
                    CommErrorKind::AlreadyInitialized,
                    "MPI is already initialised in this process: call llm_esr_comm::init once, \
                     keep the communicator it returns and use split() for sub-groups",
                ));
            };
            let world = universe.world();
            let only_thread =
                (threading < Threading::Serialized).then(|| std::thread::current().id());
            let env = Arc::new(MpiEnv {
                universe: Some(universe),
                world_size: world.size() as usize,
                only_thread,
                library: mpi::environment::library_version().unwrap_or_default(),
            });
            MpiComm::from_comm_locked(world, env)
        };
        // Outside the lock: dropping `world` on error finalises MPI, which locks.
        check_world(launch, world.size, world.rank, &world.env.library)?;
        Ok(world)
    }

    /// Wraps `comm`; computes the node-local rank with `MPI_Comm_split_type`
    /// (collective over `comm`). The caller holds `MPI_LOCK`.
    fn from_comm_locked(comm: SimpleCommunicator, env: Arc<MpiEnv>) -> MpiComm {
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        let local_rank = comm.split_shared(comm.rank()).rank() as usize;
        MpiComm {
            comm: ManuallyDrop::new(comm),
            rank,
            size,
            local_rank,
            scratch_f32: RefCell::new(Vec::new()),
            scratch_f64: RefCell::new(Vec::new()),
            env,
        }
    }

    /// The MPI library's version string (`MPI_Get_library_version`), for logs.
    pub fn library_version(&self) -> &str {
        &self.env.library
    }

    /// Takes the process-wide MPI lock after checking the calling thread.
    fn enter(&self) -> Result<MutexGuard<'static, ()>, CommError> {
        if let Some(t) = self.env.only_thread {
            if t != std::thread::current().id() {
                return Err(CommError::unavailable(
                    "this MPI library granted only MPI_THREAD_FUNNELED: use the communicator \
                     on the thread that called llm_esr_comm::init",
                ));
            }
        }
        Ok(mpi_lock())
    }

    fn all_reduce_chunked<T: Equivalence + Copy>(
        &self,
        buf: &mut [T],
        scratch: &RefCell<Vec<T>>,
    ) -> Result<(), CommError> {
        let _lock = self.enter()?;
        let mut scratch = scratch.borrow_mut();
        for chunk in buf.chunks_mut(CHUNK) {
            scratch.clear();
            scratch.extend_from_slice(chunk);
            self.comm
                .all_reduce_into(&scratch[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }

    /// Like [`Communicator::split`], keeping the concrete type (the NCCL
    /// backend builds its sub-communicators on this).
    pub fn split_mpi(&self, color: u32, key: u32) -> Result<MpiComm, CommError> {
        let as_int = |what: &str, v: u32| {
            i32::try_from(v).map_err(|_| {
                CommError::invalid(format!(
                    "split {what} {v} does not fit an MPI int (max {})",
                    i32::MAX
                ))
            })
        };
        let (color, key) = (as_int("color", color)?, as_int("key", key)?);
        let _lock = self.enter()?;
        let sub = self
            .comm
            .split_by_color_with_key(Color::with_value(color), key)
            .ok_or_else(|| CommError::invalid("MPI_Comm_split returned no communicator"))?;
        Ok(MpiComm::from_comm_locked(sub, self.env.clone()))
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        let _lock = mpi_lock();
        // SAFETY: `comm` is not used after this; `env` (and with it MPI) is
        // released only after this body returns.
        unsafe { ManuallyDrop::drop(&mut self.comm) };
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_chunked(buf, &self.scratch_f32)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        self.all_reduce_chunked(buf, &self.scratch_f64)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(root, self.size)?;
        let _lock = self.enter()?;
        let root = self.comm.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        check_root(root, self.size)?;
        let _lock = self.enter()?;
        let root_proc = self.comm.process_at_rank(root as i32);
        let mut len = [buf.len() as u64];
        root_proc.broadcast_into(&mut len[..]);
        if self.rank != root {
            buf.clear();
            buf.resize(len[0] as usize, 0);
        }
        for chunk in buf.chunks_mut(CHUNK) {
            root_proc.broadcast_into(chunk);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let _lock = self.enter()?;
        self.comm.barrier();
        Ok(())
    }

    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(self.split_mpi(color, key)?))
    }

    fn abort(&self, code: i32) -> ! {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // No lock: another thread may hold it in a collective that never ends.
        SimpleCommunicator::world().abort(code)
    }
}
