//! TensorBoard event files (`RUN/tb/events.out.tfevents.<unix>.<hostname>.ferrotune`) written
//! with our own few-field protobuf encoder and TFRecord framing, so no protobuf toolchain is
//! needed. Owns the byte format only; it neither decides what is logged nor reads files back.
//!
//! TFRecord framing of each record: `u64 len (LE)`, `u32 masked_crc32c(len bytes)`, `data`,
//! `u32 masked_crc32c(data)`. Protobuf field numbers used (tensorflow/core/util/event.proto,
//! summary.proto, tensor.proto; checked against the `tensorboard` Python package's descriptors):
//! - `Event`: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
//!   summary = 5, session_log = 7
//! - `Summary`: value = 1 (repeated); `Summary.Value`: tag = 1, simple_value = 2 (float),
//!   tensor = 8, metadata = 9
//! - `SummaryMetadata`: plugin_data = 1 { plugin_name = 1, content = 2 }
//! - `TensorProto`: dtype = 1 (DT_STRING = 7), tensor_shape = 2, string_val = 8
//! - `SessionLog`: status = 1 (START = 1)

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{ReportError, Result};
use crate::metrics::unix_now;

/// Sub-folder of the run folder that TensorBoard is pointed at.
pub const TB_DIR: &str = "tb";

/// Writes one TensorBoard event file.
#[derive(Debug)]
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Creates a new event file in `RUN/tb/`. TensorBoard reads every event file in the folder,
    /// so a resumed run simply adds a second file (see [`TensorBoardWriter::mark_resume`]).
    pub fn new(run_dir: &Path) -> Result<Self> {
        let dir = run_dir.join(TB_DIR);
        fs::create_dir_all(&dir).map_err(|e| ReportError::io("create folder", &dir, e))?;
        let secs = unix_now() as u64;
        let host = hostname();
        let mut path = dir.join(format!("events.out.tfevents.{secs}.{host}.ferrotune"));
        // Two writers started in the same second (e.g. a quick resume) must not share a file.
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{secs}.{host}.{n}.ferrotune"));
            n += 1;
        }
        Self::create(&path)
    }

    /// Creates an event file at exactly `path` (its folder must exist) and writes the
    /// `file_version` header event that TensorBoard expects first.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| ReportError::io("create", path, e))?;
        let mut writer = Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        let mut event = event_header(unix_now(), 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// Path of the event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one scalar event (not flushed; call [`flush`](Self::flush) or use
    /// [`add_scalars`](Self::add_scalars)).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut v = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut v, 1, tag.as_bytes());
        // TensorBoard's simple_value is a 32-bit float.
        put_fixed32(&mut v, 2, (value as f32).to_bits());
        self.write_summary_event(step, &v)
    }

    /// Writes one event per scalar for `step`, then flushes so the step is on disk.
    pub fn add_scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        for (tag, value) in values {
            self.add_scalar(tag, *value, step)?;
        }
        self.flush()
    }

    /// Writes a text summary (shown in TensorBoard's Text tab, rendered as Markdown), e.g. a
    /// sample completion; flushed immediately.
    pub fn add_text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin);
        let mut tensor = Vec::with_capacity(text.len() + 8);
        put_varint_field(&mut tensor, 1, 7); // DT_STRING
        put_bytes(&mut tensor, 2, &[]); // scalar: empty TensorShapeProto
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut v = Vec::with_capacity(tensor.len() + tag.len() + 16);
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 8, &tensor);
        put_bytes(&mut v, 9, &metadata);
        self.write_summary_event(step, &v)?;
        self.flush()
    }

    /// Tells TensorBoard a run restarted at `resumed_step`: a `SessionLog START` event at
    /// `resumed_step + 1` makes its loader drop points with `step > resumed_step` that were
    /// written by the interrupted run, mirroring the trimming of `metrics.jsonl`.
    pub fn mark_resume(&mut self, resumed_step: u64) -> Result<()> {
        let mut session_log = Vec::new();
        put_varint_field(&mut session_log, 1, 1); // START
        let mut event = event_header(unix_now(), resumed_step.saturating_add(1));
        put_bytes(&mut event, 7, &session_log);
        self.write_record(&event)?;
        self.flush()
    }

    /// Hands buffered events to the OS.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| ReportError::io("flush", &self.path, e))
    }

    fn write_summary_event(&mut self, step: u64, value: &[u8]) -> Result<()> {
        let mut summary = Vec::with_capacity(value.len() + 4);
        put_bytes(&mut summary, 1, value);
        let mut event = event_header(unix_now(), step);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let framed = tfrecord_frame(data);
        self.out
            .write_all(&framed)
            .map_err(|e| ReportError::io("write", &self.path, e))
    }
}

impl Drop for TensorBoardWriter {
    fn drop(&mut self) {
        // Best effort: a drop cannot report an error, and every public write already flushed.
        let _ = self.out.flush();
    }
}

/// Machine name for the event file name (TensorBoard convention); never fails.
fn hostname() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

/// `Event` prefix shared by all events: wall_time and step.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(64);
    put_fixed64(&mut e, 1, wall_time.to_bits());
    // int64 on the wire: steps above i64::MAX cannot occur in practice; saturate rather than wrap.
    put_varint_field(&mut e, 2, step.min(i64::MAX as u64));
    e
}

/// Masked CRC32C as TFRecord defines it: rotate right by 15 and add a constant, so that a CRC
/// stored inside CRC'd data does not produce degenerate checksums.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, CRC of the length, payload, CRC of the payload.
pub(crate) fn tfrecord_frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// --- protobuf wire format (only the three wire types we need) ---

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, 0);
    put_varint(buf, v);
}

fn put_fixed64(buf: &mut Vec<u8>, field: u32, bits: u64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&bits.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_fixed32(buf: &mut Vec<u8>, field: u32, bits: u32) {
    put_key(buf, field, 5);
    buf.extend_from_slice(&bits.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_protobuf_spec_examples() {
        // Examples from the protobuf encoding guide: 1 -> 01, 150 -> 96 01, 300 -> ac 02.
        for (v, want) in [
            (1u64, vec![0x01]),
            (150, vec![0x96, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b, want, "varint({v})");
        }
        // Field 1, varint 150 is the guide's `08 96 01`.
        let mut b = Vec::new();
        put_varint_field(&mut b, 1, 150);
        assert_eq!(b, vec![0x08, 0x96, 0x01]);
    }

    #[test]
    fn crc32c_check_value() {
        // The CRC-32C catalogue check value for "123456789" is 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
