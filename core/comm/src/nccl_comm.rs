//! The NCCL backend (cudarc's NCCL bindings), behind the `nccl` cargo feature.
//!
//! **Untested on hardware**: this crate is developed on machines without a GPU
//! or CUDA toolkit. `cargo check --features nccl` compiles it (cudarc loads
//! libcuda and libnccl at run time, so no CUDA library is needed to build this
//! crate alone), but no code here has been run. Treat the first GPU run as its
//! test: `comm-selftest --backend nccl` under `mpirun -np 2` on a node with two
//! GPUs.
//!
//! Set-up: MPI is initialised first (NCCL needs it to bootstrap); every rank
//! opens a CUDA context on device `local_rank` (or device 0 when the launcher
//! made only one device visible per rank); rank 0 makes the NCCL unique id and
//! broadcasts it over MPI; then every rank joins with `ncclCommInitRank`.
//! Failures of CUDA set-up on any rank are agreed on over MPI first, so that
//! all ranks return an error instead of some waiting in NCCL for ever.
//!
//! Host buffers: [`Communicator::all_reduce_sum`] and
//! [`Communicator::broadcast`] copy the host buffer to a device staging buffer
//! (kept between calls), run the NCCL collective on this communicator's stream,
//! copy the result back and synchronise. Device-resident buffers avoid the
//! copies with [`NcclComm::all_reduce_sum_device`]. The `f64` reduction,
//! `broadcast_bytes`, `barrier` and `split` go over MPI (host data).

use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::error::{check_root, CommError, CommErrorKind};
use crate::launch::Launch;
use crate::mpi_comm::MpiComm;
use crate::{pick_device, Communicator};

fn device_err(what: &str, e: impl std::fmt::Display) -> CommError {
    CommError::new(CommErrorKind::Device, format!("{what}: {e}"))
}

fn cuda(what: &'static str) -> impl Fn(DriverError) -> CommError {
    move |e| device_err(what, e)
}

fn nccl(what: &'static str) -> impl Fn(NcclError) -> CommError {
    move |e| device_err(what, format!("{:?}", e.0))
}

/// Runs `f`, turning a panic (cudarc panics when libcuda or libnccl cannot be
/// loaded) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(device_err(
            what,
            format!("{msg} (is the NVIDIA driver installed and libnccl on LD_LIBRARY_PATH?)"),
        ))
    })
}

/// NCCL communicator for one rank on one GPU, bootstrapped over MPI.
pub struct NcclComm {
    // Drop order: NCCL communicator, then device memory, then stream/context,
    // then MPI (which may finalise).
    nccl: Comm,
    staging: RefCell<Option<CudaSlice<f32>>>,
    stream: Arc<CudaStream>,
    mpi: MpiComm,
}

// SAFETY: cudarc's `Comm` holds a raw `ncclComm_t` and is therefore `!Send`.
// NCCL communicators may be used from any thread as long as calls on one
// communicator are not concurrent; `NcclComm` is `!Sync` (RefCell), every call
// binds the CUDA context to the calling thread first, and the MPI part is
// `Send` on its own.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Initialises MPI (see [`MpiComm::init`]) and NCCL on top of it.
    pub fn init(launch: Option<&Launch>) -> Result<NcclComm, CommError> {
        NcclComm::over(MpiComm::init(launch)?, None)
    }

    /// Builds the NCCL communicator for the ranks of `mpi`. `ctx` reuses an
    /// existing CUDA context (for `split`); `None` opens one on the device
    /// chosen by [`pick_device`]. Collective over `mpi`.
    pub fn over(mpi: MpiComm, ctx: Option<Arc<CudaContext>>) -> Result<NcclComm, CommError> {
        let local_rank = mpi.local_rank();
        let setup = guarded("CUDA set-up", || {
            let ctx = match ctx {
                Some(ctx) => ctx,
                None => {
                    let n = CudaContext::device_count().map_err(cuda("counting CUDA devices"))?;
                    let ordinal = pick_device(local_rank, n.max(0) as usize)?;
                    CudaContext::new(ordinal).map_err(cuda("opening the CUDA device"))?
                }
            };
            let stream = ctx.new_stream().map_err(cuda("creating a CUDA stream"))?;
            Ok(stream)
        });
        // Agree on success before anyone waits in NCCL for a rank that failed.
        let mut failed = [f64::from(u8::from(setup.is_err()))];
        mpi.all_reduce_sum_f64(&mut failed)?;
        let stream = setup?;
        if failed[0] > 0.0 {
            return Err(CommError::new(
                CommErrorKind::RemoteFailure,
                format!(
                    "{} other rank(s) failed to set up CUDA for the nccl backend; see their \
                     error messages",
                    failed[0]
                ),
            ));
        }

        let id = crate::share_unique_id(&mpi, || {
            let id = guarded("ncclGetUniqueId", || {
                Id::new().map_err(nccl("ncclGetUniqueId"))
            })?;
            Ok(id.internal().map(|c| c as u8))
        })?;
        let internal: [c_char; crate::UNIQUE_ID_BYTES] = id.map(|b| b as c_char);

        let (rank, size) = (mpi.rank(), mpi.size());
        let nccl_comm = guarded("ncclCommInitRank", || {
            stream
                .context()
                .bind_to_thread()
                .map_err(cuda("binding the CUDA context"))?;
            Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
                .map_err(nccl("ncclCommInitRank"))
        })?;
        Ok(NcclComm {
            nccl: nccl_comm,
            staging: RefCell::new(None),
            stream,
            mpi,
        })
    }

    /// The stream NCCL runs on. Device buffers used with the `*_device`
    /// methods are ordered against it by cudarc's event tracking.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (device) of this rank.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    /// The MPI communicator underneath (same ranks).
    pub fn mpi(&self) -> &MpiComm {
        &self.mpi
    }

    /// Sums a device-resident buffer over all ranks, in place, on
    /// [`NcclComm::stream`]. Returns once the work is enqueued (no host sync):
    /// later uses of `buf` on other streams wait for it through cudarc's events.
    pub fn all_reduce_sum_device<B: DevicePtrMut<f32>>(
        &self,
        buf: &mut B,
    ) -> Result<(), CommError> {
        self.bind()?;
        self.nccl
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl("ncclAllReduce"))?;
        Ok(())
    }

    /// Broadcasts a device-resident buffer from `root`, in place, on
    /// [`NcclComm::stream`] (no host sync).
    pub fn broadcast_device<B: DevicePtrMut<f32>>(
        &self,
        buf: &mut B,
        root: usize,
    ) -> Result<(), CommError> {
        check_root(root, self.mpi.size())?;
        self.bind()?;
        self.nccl
            .broadcast_in_place(buf, root as i32)
            .map_err(nccl("ncclBroadcast"))?;
        Ok(())
    }

    fn bind(&self) -> Result<(), CommError> {
        self.context()
            .bind_to_thread()
            .map_err(cuda("binding the CUDA context"))
    }

    /// Copies `buf` to the staging buffer, runs `op` on it, copies back.
    fn via_device(
        &self,
        buf: &mut [f32],
        op: impl FnOnce(&mut cudarc::driver::CudaViewMut<'_, f32>) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut staging = self.staging.borrow_mut();
        if staging.as_ref().is_none_or(|s| s.len() < buf.len()) {
            *staging = None; // free the old one first
            *staging = Some(
                self.stream
                    .alloc_zeros::<f32>(buf.len())
                    .map_err(cuda("allocating the NCCL staging buffer"))?,
            );
        }
        let dev = staging.as_mut().expect("staging buffer was just allocated");
        let mut view = dev.slice_mut(0..buf.len());
        self.stream
            .memcpy_htod(&*buf, &mut view)
            .map_err(cuda("copying to the GPU"))?;
        op(&mut view)?;
        self.stream
            .memcpy_dtoh(&view, buf)
            .map_err(cuda("copying from the GPU"))?;
        self.stream
            .synchronize()
            .map_err(cuda("synchronising the NCCL stream"))
    }
}

impl Communicator for NcclComm {
    fn as_nccl(&self) -> Option<&NcclComm> {
        Some(self)
    }

    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn local_rank(&self) -> usize {
        self.mpi.local_rank()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    /// Host -> GPU copy, `ncclAllReduce` (sum), GPU -> host copy, synchronise.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.via_device(buf, |view| {
            self.nccl
                .all_reduce_in_place(view, &ReduceOp::Sum)
                .map_err(nccl("ncclAllReduce"))?;
            Ok(())
        })
    }

    /// Over MPI (metrics are small host buffers).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        self.mpi.all_reduce_sum_f64(buf)
    }

    /// Host -> GPU copy, `ncclBroadcast`, GPU -> host copy, synchronise.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(root, self.size())?;
        self.via_device(buf, |view| {
            self.nccl
                .broadcast_in_place(view, root as i32)
                .map_err(nccl("ncclBroadcast"))?;
            Ok(())
        })
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        self.mpi.broadcast_bytes(buf, root)
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.mpi.barrier()
    }

    /// Splits the MPI communicator and builds a new NCCL communicator on the
    /// same device for each part.
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>, CommError> {
        let sub = self.mpi.split_mpi(color, key)?;
        Ok(Box::new(NcclComm::over(sub, Some(self.context().clone()))?))
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
