//! Memory the process may still use, and refusing work that cannot fit.
//!
//! Input sizes (ids, item counts, configured sizes) drive the large
//! allocations; Rust aborts the process when an allocation fails. Before a
//! large allocation the callers estimate its size and ask [`ensure_fits`],
//! which turns "this cannot fit" into an error that says what to change.
//! Available memory is `MemAvailable` of `/proc/meminfo`, lowered to the room
//! left under a cgroup v2 limit (`memory.max` - `memory.current`) when there
//! is one; where neither can be read, nothing is refused.

use anyhow::{bail, Result};

/// Bytes this process can still allocate without swapping or being killed,
/// when the system says so (Linux); `None` elsewhere.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kib.saturating_mul(1024);
    if let Some(room) = cgroup_room() {
        avail = avail.min(room);
    }
    Some(avail)
}

/// Room left under this process's cgroup v2 memory limit, if it has one.
fn cgroup_room() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = std::path::Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" (no limit) does not parse
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// `bytes` in GiB (or MiB below 1 GiB) for messages.
pub fn human(bytes: f64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024.0 * MIB {
        format!("{:.1} GiB", bytes / (1024.0 * MIB))
    } else {
        format!("{:.0} MiB", (bytes / MIB).ceil())
    }
}

/// Fails when `bytes` (an estimate of what `what` will allocate) exceed the
/// memory available now; `fix` says what to change. Does nothing where the
/// available memory cannot be read.
pub fn ensure_fits(what: &str, bytes: f64, fix: &str) -> Result<()> {
    let Some(avail) = available_bytes() else {
        return Ok(());
    };
    if bytes > avail as f64 {
        bail!(
            "not enough memory: {what} needs about {} but only {} is available (MemAvailable); \
             {fix}",
            human(bytes),
            human(avail as f64)
        );
    }
    Ok(())
}

/// `Vec::try_reserve_exact` with an error that names `what` instead of an abort.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    if v.try_reserve_exact(additional).is_err() {
        bail!(
            "not enough memory: cannot allocate {} for {what} ({additional} entries)",
            human((additional as f64) * std::mem::size_of::<T>() as f64)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_fit_and_reserves_what_can() {
        if available_bytes().is_some() {
            let e = ensure_fits("a test table", 1e30, "lower it").unwrap_err();
            let m = format!("{e:#}");
            assert!(m.contains("a test table") && m.contains("lower it"), "{m}");
        }
        ensure_fits("nothing", 0.0, "").unwrap();
        let mut v: Vec<u64> = Vec::new();
        assert!(try_reserve(&mut v, usize::MAX / 2, "a huge table").is_err());
        try_reserve(&mut v, 10, "ten").unwrap();
        assert!(v.capacity() >= 10);
    }
}
