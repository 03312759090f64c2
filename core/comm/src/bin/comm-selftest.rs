//! Checks a communicator end to end; every rank verifies its own results.
//!
//! ```text
//! mpirun -np 2 target/release/comm-selftest                 # MPI (auto)
//! mpirun -np 2 target/release/comm-selftest --backend nccl  # GPU nodes only
//! target/release/comm-selftest                              # single process
//! ```
//!
//! Exit status: 0 when all checks pass; 1 when a check fails (the job is
//! aborted so that no rank waits for one that stopped); 2 when the
//! communicator cannot be built (e.g. the launcher/MPI mismatch).
//!
//! Failure drills (the job must end, not hang): `--drill abort` (rank 1 calls
//! `abort(3)` while the others wait in a barrier) and `--drill panic` (rank 1
//! panics while the others wait).

use std::process::ExitCode;

use llm_esr_comm::{
    init, share_unique_id, Backend, CommError, CommErrorKind, Communicator, UNIQUE_ID_BYTES,
};

const USAGE: &str = "usage: comm-selftest [--backend auto|single|mpi|nccl] [--drill abort|panic]";

/// Values exactly representable in f32 and in any summation order.
fn value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * 1000 + i % 997) as f32 * 0.5
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// The NCCL bootstrap's exchange, with an opaque id: every rank gets rank
/// 0's 128 bytes; when rank 0 cannot make one, it gets its own error and the
/// others a remote failure, and nobody hangs.
fn unique_id(comm: &dyn Communicator) -> Result<(), String> {
    let rank = comm.rank();
    let made: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 31 + 5) as u8);
    let id = share_unique_id(comm, || Ok(made)).map_err(|e| e.to_string())?;
    check(id == made, || {
        format!("share_unique_id: rank {rank} got another id")
    })?;
    let failed = share_unique_id(comm, || {
        Err(CommError::new(CommErrorKind::Device, "drill: no unique id"))
    });
    let want = if rank == 0 {
        CommErrorKind::Device
    } else {
        CommErrorKind::RemoteFailure
    };
    check(
        failed.as_ref().err().map(CommError::kind) == Some(want),
        || format!("share_unique_id with a failing rank 0: rank {rank} got {failed:?}"),
    )
}

fn checks(comm: &dyn Communicator) -> Result<(), String> {
    let (rank, size) = (comm.rank(), comm.size());
    let e = |e: llm_esr_comm::CommError| e.to_string();

    // all_reduce_sum: a small buffer, an empty one, and one larger than a chunk.
    for len in [5usize, 0, (1 << 23) + 12_345] {
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        comm.all_reduce_sum(&mut buf).map_err(e)?;
        for (i, got) in buf.iter().enumerate() {
            let want: f32 = (0..size).map(|r| value(r, i)).sum();
            check(*got == want, || {
                format!("all_reduce_sum(len {len})[{i}] = {got}, want {want}")
            })?;
        }
    }

    let mut metrics = [rank as f64 + 0.25, 1e-3, -(rank as f64)];
    comm.all_reduce_sum_f64(&mut metrics).map_err(e)?;
    let n = size as f64;
    let want = [
        n * (n - 1.0) / 2.0 + 0.25 * n,
        1e-3 * n,
        -n * (n - 1.0) / 2.0,
    ];
    for (got, want) in metrics.iter().zip(want) {
        check((got - want).abs() <= 1e-12 * want.abs().max(1.0), || {
            format!("all_reduce_sum_f64: got {metrics:?}, want {want:?}")
        })?;
    }

    // broadcast from the last rank.
    let root = size - 1;
    let mut buf: Vec<f32> = (0..1000).map(|i| value(rank, i)).collect();
    comm.broadcast(&mut buf, root).map_err(e)?;
    check(
        buf.iter().enumerate().all(|(i, v)| *v == value(root, i)),
        || format!("broadcast from {root}: wrong values on rank {rank}"),
    )?;

    // broadcast_bytes: receivers start with other lengths.
    for msg_len in [0usize, 3, 100_000] {
        let mut bytes: Vec<u8> = if rank == 0 {
            (0..msg_len).map(|i| (i * 7 % 251) as u8).collect()
        } else {
            vec![9; rank * 13]
        };
        comm.broadcast_bytes(&mut bytes, 0).map_err(e)?;
        let want: Vec<u8> = (0..msg_len).map(|i| (i * 7 % 251) as u8).collect();
        check(bytes == want, || {
            format!(
                "broadcast_bytes(len {msg_len}): rank {rank} got {} bytes",
                bytes.len()
            )
        })?;
    }

    unique_id(comm)?;
    comm.barrier().map_err(e)?;

    // A bad root is an error on every rank, not an abort or a hang.
    check(comm.broadcast(&mut [0.0], size).is_err(), || {
        "broadcast with root == size was accepted".into()
    })?;

    // split: even / odd ranks, reversed order inside each part.
    let color = (rank % 2) as u32;
    let sub = comm.split(color, (size - rank) as u32).map_err(e)?;
    let members: Vec<usize> = (0..size).filter(|r| r % 2 == rank % 2).collect();
    let want_rank = members.iter().rev().position(|&r| r == rank).unwrap();
    check(
        sub.size() == members.len() && sub.rank() == want_rank,
        || {
            format!(
                "split: rank {rank} got rank {}/{}, want {want_rank}/{}",
                sub.rank(),
                sub.size(),
                members.len()
            )
        },
    )?;
    check(sub.backend() == comm.backend(), || {
        "split changed the backend".into()
    })?;
    let mut part = [rank as f32, 1.0];
    sub.all_reduce_sum(&mut part).map_err(e)?;
    let want = [members.iter().sum::<usize>() as f32, members.len() as f32];
    check(part == want, || {
        format!("all_reduce_sum in split part {color}: got {part:?}, want {want:?}")
    })?;
    let mut from_sub_root = if sub.rank() == 0 {
        vec![rank as u8]
    } else {
        Vec::new()
    };
    sub.broadcast_bytes(&mut from_sub_root, 0).map_err(e)?;
    check(from_sub_root == [*members.last().unwrap() as u8], || {
        format!("broadcast in split part {color}: got {from_sub_root:?}")
    })?;
    sub.barrier().map_err(e)?;
    drop(sub);

    comm.barrier().map_err(e)?;
    Ok(())
}

fn main() -> ExitCode {
    let mut backend = Backend::Auto;
    let mut drill: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => match args.next().as_deref().map(Backend::parse) {
                Some(Ok(b)) => backend = b,
                Some(Err(err)) => {
                    eprintln!("comm-selftest: {err}");
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--drill" => drill = args.next(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("comm-selftest: unknown argument `{other}`\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    let comm = match init(backend) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("comm-selftest: cannot build the communicator: {err}");
            return ExitCode::from(2);
        }
    };
    let (rank, size) = (comm.rank(), comm.size());

    match drill.as_deref() {
        None => {}
        Some("abort") if rank == 1 => {
            eprintln!("comm-selftest: rank 1 aborts (drill)");
            comm.abort(3);
        }
        Some("panic") if rank == 1 => panic!("comm-selftest: rank 1 panics (drill)"),
        Some("abort" | "panic") => {
            // Wait for rank 1, which never comes: the launcher must end us.
            let _ = comm.barrier();
            eprintln!("comm-selftest: rank {rank} passed a barrier that rank 1 never entered");
            return ExitCode::from(1);
        }
        Some(other) => {
            eprintln!("comm-selftest: unknown drill `{other}`\n{USAGE}");
            return ExitCode::from(2);
        }
    }

    match checks(comm.as_ref()) {
        Ok(()) => {
            println!(
                "comm-selftest: rank {rank}/{size} (local rank {}, backend {}): all checks passed",
                comm.local_rank(),
                comm.backend()
            );
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("comm-selftest: rank {rank}/{size}: FAILED: {msg}");
            if size > 1 {
                comm.abort(1);
            }
            ExitCode::from(1)
        }
    }
}
