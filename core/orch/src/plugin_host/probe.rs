//! Probing a plugin file in a child process, so that a crash in its
//! constructors or `create` refuses that plugin instead of ending this one.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use llm_esr_runtime::abi::DeclarationInfo;

use super::open::{create_checked, open_checked};
use super::{Found, INSPECT_COMMAND};

/// How long a child inspecting one plugin may take before it is killed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Inspects one plugin file in a child process: `exe __inspect-plugin PATH`
/// opens it, checks its declaration and calls its `create`. A child that dies
/// by a signal (a crash in the library's constructors or in `create`), fails
/// otherwise or takes longer than a minute gives a refusal; this process never
/// opens the file. See [`inspector_main`] for the child's side.
pub fn probe(exe: &Path, path: &Path) -> Found {
    let found = Found::new(path);
    let child = Command::new(exe)
        .arg(INSPECT_COMMAND)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return found.refuse(format!(
                "cannot start the plugin inspector {}: {e}",
                exe.display()
            ))
        }
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > PROBE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "did not finish loading within {} s (killed)",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => break Err(format!("cannot wait for the plugin inspector: {e}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let status = match status {
        Ok(s) => s,
        Err(why) => return found.refuse(why),
    };
    read_report(found, &stdout, &stderr, status)
}

/// The parent's reading of a child inspector: its JSON lines, then its fate.
fn read_report(mut found: Found, stdout: &str, stderr: &str, status: ExitStatus) -> Found {
    // The first line comes once the declaration was read and checked; the
    // second, if any, once `create` returned.
    let mut declared = false;
    let mut created = false;
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(d) = v.get("declaration") {
            declared = true;
            found.info = info_from_json(d);
            if let Some(info) = &found.info {
                found.name = info.name.clone();
            }
        }
        if v.get("created").is_some() {
            created = true;
        }
        if let Some(why) = v.get("refused").and_then(|r| r.as_str()) {
            found.refused = Some(why.to_string());
        }
    }
    found.inspected = true;
    if status.success() {
        if !declared && found.refused.is_none() {
            found.refused = Some(format!(
                "the plugin inspector printed no declaration: {}",
                stderr.trim()
            ));
        }
        return found;
    }
    let stage = if !declared {
        "while loading"
    } else if found.refused.is_none() && !created {
        "in its `create()`"
    } else {
        "while unloading"
    };
    let why = match signal_of(status) {
        Some(sig) => format!("crashed {stage} ({})", describe_signal(sig)),
        None => {
            let last = stderr.trim().lines().last().unwrap_or("");
            let sep = if last.is_empty() { "" } else { ": " };
            format!("the plugin inspector failed ({status}) {stage}{sep}{last}")
        }
    };
    found.refused = Some(why);
    found
}

fn info_from_json(d: &serde_json::Value) -> Option<DeclarationInfo> {
    let s = |k: &str| d.get(k)?.as_str().map(str::to_string);
    Some(DeclarationInfo {
        abi_version: d.get("abi_version")?.as_u64()? as u32,
        rustc_version: s("rustc_version")?,
        fingerprint: s("fingerprint")?,
        kind: s("kind")?,
        name: s("name")?,
        version: s("version")?,
    })
}

fn info_to_json(i: &DeclarationInfo) -> serde_json::Value {
    serde_json::json!({
        "abi_version": i.abi_version,
        "rustc_version": i.rustc_version,
        "fingerprint": i.fingerprint,
        "kind": i.kind,
        "name": i.name,
        "version": i.version,
    })
}

#[cfg(unix)]
fn signal_of(status: ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}

#[cfg(not(unix))]
fn signal_of(_status: ExitStatus) -> Option<i32> {
    None
}

/// `signal 11, SIGSEGV`.
fn describe_signal(sig: i32) -> String {
    #[cfg(target_os = "linux")]
    const BUS: i32 = 7;
    #[cfg(not(target_os = "linux"))]
    const BUS: i32 = 10;
    let name = match sig {
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        s if s == BUS => "SIGBUS",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig}, {name}")
}

/// The child's side of [`probe`] (`llm-esr-orch __inspect-plugin PATH`): opens
/// the file here, prints one JSON line `{"path", "declaration", "refused"}`
/// (`declaration` null when it could not be read), and, when the plugin passed
/// every check, calls its `create` and prints `{"created": kind}` or
/// `{"refused": why}`. Each line is flushed before the next step, so that the
/// parent can tell where a crash happened.
pub fn inspector_main(path: &Path) -> Result<()> {
    let (found, decl) = open_checked(path);
    let mut out = std::io::stdout().lock();
    let line = serde_json::json!({
        "path": path.display().to_string(),
        "declaration": found.info.as_ref().map(info_to_json),
        "refused": found.refused,
    });
    writeln!(out, "{line}")?;
    out.flush()?;
    if let (Some(info), Some(decl)) = (&found.info, decl) {
        // A panic is caught (and becomes the refusal); its message goes to
        // stderr, which the parent keeps to itself.
        let line = match create_checked(path, info, decl) {
            Ok(plugin) => serde_json::json!({ "created": plugin.kind().as_str() }),
            Err(e) => serde_json::json!({ "refused": format!("{e:#}") }),
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}
