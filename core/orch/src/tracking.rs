//! TensorBoard event files (`tracking.tensorboard`): scalars per epoch and
//! the resolved config as text, written by rank 0.
//!
//! Written here rather than with the `tboard` crate: `tboard` generates its
//! protobuf code at build time with `prost-build`, which needs the `protoc`
//! compiler on every machine that builds the project (a system package the
//! README's fresh-machine set-up does not have). What TensorBoard reads is
//! small: TFRecord framing (length, masked CRC-32C of the length, the record,
//! masked CRC-32C of the record) around `Event` protobuf messages, of which
//! this module writes three kinds with a hand-rolled encoder of the few
//! fields involved (field numbers from tensorflow/core/util/event.proto and
//! framework/summary.proto). CRC-32C comes from the `crc` crate. Checked
//! once against TensorBoard itself (2026-12-01, `tensorboard` from PyPI,
//! `EventAccumulator` on a 2-epoch beauty5_tiny run): every scalar tag, its
//! steps and values (as in metrics.jsonl and results.json) and the config
//! text were read back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use crc::{Crc, CRC_32_ISCSI};
use tracing::info;

use crate::config::{expand_env, Config};
use crate::eval::Metrics;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// What a run reports to TensorBoard, when `tracking.tensorboard` is set.
pub struct Tracker {
    events: EventWriter,
}

impl Tracker {
    /// The run's event file in `<tracking.tensorboard>/<name>/`, starting
    /// with the resolved config as text; `None` when tracking is off.
    pub fn open(cfg: &Config) -> Result<Option<Tracker>> {
        let Some(dir) = &cfg.tracking.tensorboard else {
            return Ok(None);
        };
        let dir = PathBuf::from(expand_env("tracking.tensorboard", dir)?).join(&cfg.name);
        let mut events = EventWriter::create(&dir)?;
        events.text(0, "config", &format!("```\n{}\n```", cfg.to_yaml()?))?;
        events.flush()?;
        info!("TensorBoard events: {}", events.path().display());
        Ok(Some(Tracker { events }))
    }

    /// `train/loss` and `valid/<group>/<metric>` of epoch `epoch` (from 1).
    pub fn epoch(&mut self, epoch: usize, loss: f64, valid: &Metrics) -> Result<()> {
        self.events
            .scalar(epoch as i64, "train/loss", loss as f32)?;
        self.metrics(epoch, "valid", valid)?;
        self.events.flush()
    }

    /// `test/<group>/<metric>` of the best parameters, at step `epoch`.
    pub fn test(&mut self, epoch: usize, test: &Metrics) -> Result<()> {
        self.metrics(epoch, "test", test)?;
        self.events.flush()
    }

    fn metrics(&mut self, step: usize, split: &str, m: &Metrics) -> Result<()> {
        for g in &m.groups {
            for (metric, value) in &g.values {
                let tag = format!("{split}/{}/{metric}", g.group.name());
                self.events.scalar(step as i64, &tag, *value as f32)?;
            }
        }
        Ok(())
    }
}

/// One run's event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), named like
    /// TensorFlow's (`events.out.tfevents.<seconds>.<host>`), starting with
    /// the file-version record TensorBoard expects first.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create TensorBoard directory {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut name = format!("events.out.tfevents.{secs}.{host}");
        // A second writer within the same second (a resumed run) gets its
        // own file: TensorBoard reads every file of the directory.
        let mut n = 1;
        while dir.join(&name).exists() {
            name = format!("events.out.tfevents.{secs}.{host}.{n}");
            n += 1;
        }
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter {
            file: BufWriter::new(file),
            path,
        };
        let mut event = event_header(0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scalar `tag` at `step`.
    pub fn scalar(&mut self, step: i64, tag: &str, value: f32) -> Result<()> {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_f32(&mut v, 2, value);
        self.summary(step, &v)
    }

    /// A text `tag` at `step` (TensorBoard's text plugin: a string tensor
    /// with the plugin named in the summary's metadata).
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        field_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        field_bytes(&mut metadata, 1, &plugin);
        let mut tensor = Vec::new();
        field_varint(&mut tensor, 1, 7); // dtype: DT_STRING
        field_bytes(&mut tensor, 2, &[]); // shape: a scalar
        field_bytes(&mut tensor, 8, text.as_bytes()); // string_val
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_bytes(&mut v, 8, &tensor);
        field_bytes(&mut v, 9, &metadata);
        self.summary(step, &v)
    }

    /// Writes what is buffered (after each epoch: TensorBoard reads the file
    /// while the run goes on).
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// An event holding one summary value.
    fn summary(&mut self, step: i64, value: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, value);
        let mut event = event_header(step);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// One TFRecord.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&out)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// `Event.wall_time` (1, double) and `Event.step` (2, int64).
fn event_header(step: i64) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut e = Vec::new();
    e.push(1 << 3 | 1);
    e.extend_from_slice(&now.to_le_bytes());
    field_varint(&mut e, 2, step as u64);
    e
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = CRC32C.checksum(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn field_f32(out: &mut Vec<u8>, field: u64, v: f32) {
    varint(out, field << 3 | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value of CRC-32C, and TFRecord's masking of it.
    #[test]
    fn crc32c_and_its_mask() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8, computed by hand.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    /// A scalar summary encodes as protobuf decoders expect: Summary.value
    /// (1) { tag (1) = "a", simple_value (2) = 1.0f }.
    #[test]
    fn scalar_value_bytes() {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, b"a");
        field_f32(&mut v, 2, 1.0);
        assert_eq!(v, [0x0a, 0x01, b'a', 0x15, 0x00, 0x00, 0x80, 0x3f]);
        let mut big = Vec::new();
        field_varint(&mut big, 2, 300);
        assert_eq!(big, [0x10, 0xac, 0x02]);
    }

    /// Every record of a written file is framed with valid CRCs.
    #[test]
    fn records_are_framed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = EventWriter::create(dir.path())?;
        w.scalar(1, "train/loss", 0.5)?;
        w.text(0, "config", "seed: 42")?;
        w.flush()?;
        let bytes = std::fs::read(w.path())?;
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?);
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into()?);
            assert_eq!(crc, masked_crc(data));
            at += 16 + len;
            records += 1;
        }
        assert_eq!((records, at), (3, bytes.len()));
        Ok(())
    }
}
