//! Tests for TensorBoard event files with a reader written here, independent of the writer:
//! a bitwise CRC-32C (checked against the catalogue value), TFRecord unframing, and a minimal
//! protobuf decoder. The same files load in TensorBoard's own `EventAccumulator`:
//! `fixtures/report/check_tfevents.py` (run on the file from `write_file_for_python_check`).

use ferrotune_report::{TensorBoardWriter, TB_DIR};
use std::fs;
use std::path::Path;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Written as TensorFlow's `crc32c::Mask` spells it, not via the writer's `rotate_right`.
#[allow(clippy::manual_rotate)]
fn masked(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into payloads, asserting both CRCs of every record.
fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            masked(crc32c_bitwise(len_bytes)),
            "length CRC of record {}",
            out.len()
        );
        let data = &bytes[i + 12..i + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(
            data_crc,
            masked(crc32c_bitwise(data)),
            "data CRC of record {}",
            out.len()
        );
        out.push(data.to_vec());
        i += 16 + len;
    }
    assert_eq!(i, bytes.len(), "trailing bytes");
    out
}

#[derive(Debug, Clone)]
enum Field {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
}

fn read_varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Decodes one protobuf message into (field number, value) pairs.
fn fields(b: &[u8]) -> Vec<(u64, Field)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = read_varint(b, &mut i);
        let (num, wt) = (key >> 3, key & 7);
        let f = match wt {
            0 => Field::Varint(read_varint(b, &mut i)),
            1 => {
                let v = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
                i += 8;
                Field::Fixed64(v)
            }
            2 => {
                let n = read_varint(b, &mut i) as usize;
                let v = b[i..i + n].to_vec();
                i += n;
                Field::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
                i += 4;
                Field::Fixed32(v)
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((num, f));
    }
    out
}

fn get(fs: &[(u64, Field)], num: u64) -> Option<Field> {
    fs.iter().find(|(n, _)| *n == num).map(|(_, f)| f.clone())
}

fn bytes(f: Option<Field>) -> Vec<u8> {
    match f {
        Some(Field::Bytes(b)) => b,
        other => panic!("expected bytes, got {other:?}"),
    }
}

#[derive(Debug, PartialEq)]
enum Decoded {
    FileVersion(String),
    Scalar {
        step: u64,
        tag: String,
        value: f32,
    },
    Text {
        step: u64,
        tag: String,
        plugin: String,
        text: String,
    },
    Start {
        step: u64,
    },
}

fn decode_event(data: &[u8]) -> (f64, Decoded) {
    let ev = fields(data);
    let wall = match get(&ev, 1) {
        Some(Field::Fixed64(bits)) => f64::from_bits(bits),
        other => panic!("wall_time missing: {other:?}"),
    };
    let step = match get(&ev, 2) {
        Some(Field::Varint(s)) => s,
        None => 0,
        other => panic!("bad step {other:?}"),
    };
    if let Some(Field::Bytes(v)) = get(&ev, 3) {
        return (wall, Decoded::FileVersion(String::from_utf8(v).unwrap()));
    }
    if let Some(Field::Bytes(log)) = get(&ev, 7) {
        assert!(
            matches!(get(&fields(&log), 1), Some(Field::Varint(1))),
            "status START"
        );
        return (wall, Decoded::Start { step });
    }
    let summary = fields(&bytes(get(&ev, 5)));
    let value = fields(&bytes(get(&summary, 1)));
    let tag = String::from_utf8(bytes(get(&value, 1))).unwrap();
    if let Some(Field::Fixed32(bits)) = get(&value, 2) {
        return (
            wall,
            Decoded::Scalar {
                step,
                tag,
                value: f32::from_bits(bits),
            },
        );
    }
    let tensor = fields(&bytes(get(&value, 8)));
    assert!(
        matches!(get(&tensor, 1), Some(Field::Varint(7))),
        "dtype DT_STRING"
    );
    let text = String::from_utf8(bytes(get(&tensor, 8))).unwrap();
    let meta = fields(&bytes(get(&value, 9)));
    let plugin_data = fields(&bytes(get(&meta, 1)));
    let plugin = String::from_utf8(bytes(get(&plugin_data, 1))).unwrap();
    (
        wall,
        Decoded::Text {
            step,
            tag,
            plugin,
            text,
        },
    )
}

/// The demo run both this test and the Python check expect: loss = 2 - 0.1 * step for steps
/// 1..=10, lr 2e-4, a text sample at step 5; then a resume after step 7 rewrites steps 8..=10
/// with loss = 100 + step.
fn write_demo(w: &mut TensorBoardWriter) {
    for step in 1..=10u64 {
        w.add_scalars(
            step,
            &[("train/loss", 2.0 - 0.1 * step as f64), ("train/lr", 2e-4)],
        )
        .unwrap();
        if step == 5 {
            w.add_text("samples/completion", "The answer is **42**.", step)
                .unwrap();
        }
    }
    w.mark_resume(7).unwrap();
    for step in 8..=10u64 {
        w.add_scalars(step, &[("train/loss", 100.0 + step as f64)])
            .unwrap();
    }
}

#[test]
fn records_decode_with_valid_crcs_and_recover_values() {
    assert_eq!(
        crc32c_bitwise(b"123456789"),
        0xE306_9283,
        "reference CRC-32C check value"
    );
    let run = std::env::temp_dir().join(format!("ferrotune-report-tb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&run);
    let mut w = TensorBoardWriter::new(&run).unwrap();
    let path = w.path().to_path_buf();
    write_demo(&mut w);
    // Everything is on disk before the writer is dropped (flushed after each step).
    let bytes = fs::read(&path).unwrap();
    drop(w);

    assert_eq!(path.parent().unwrap(), run.join(TB_DIR));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(".ferrotune"),
        "{name}"
    );

    let events: Vec<(f64, Decoded)> = read_records(&bytes)
        .iter()
        .map(|r| decode_event(r))
        .collect();
    assert_eq!(events[0].1, Decoded::FileVersion("brain.Event:2".into()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(events.iter().all(|(t, _)| (now - t).abs() < 60.0));

    let scalars: Vec<(u64, &str, f32)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Decoded::Scalar { step, tag, value } => Some((*step, tag.as_str(), *value)),
            _ => None,
        })
        .collect();
    assert_eq!(scalars.len(), 10 * 2 + 3);
    assert_eq!(scalars[0], (1, "train/loss", 1.9f32));
    assert_eq!(scalars[1], (1, "train/lr", 2e-4f32));
    assert_eq!(scalars[19], (10, "train/lr", 2e-4f32));
    assert_eq!(scalars[20], (8, "train/loss", 108.0f32));
    let texts: Vec<&Decoded> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| matches!(e, Decoded::Text { .. }))
        .collect();
    assert_eq!(
        texts,
        vec![&Decoded::Text {
            step: 5,
            tag: "samples/completion".into(),
            plugin: "text".into(),
            text: "The answer is **42**.".into()
        }]
    );
    assert!(events.iter().any(|(_, e)| *e == Decoded::Start { step: 8 }));
}

/// Writes the demo event file to `$FERROTUNE_TB_OUT/` for the Python check; a no-op otherwise.
/// `FERROTUNE_TB_OUT=/tmp/tbcheck cargo test -p ferrotune-report --test tensorboard` then
/// `/work/pyenv/bin/python fixtures/report/check_tfevents.py /tmp/tbcheck/tb`.
#[test]
fn write_file_for_python_check() {
    let Ok(dir) = std::env::var("FERROTUNE_TB_OUT") else {
        return;
    };
    let dir = Path::new(&dir);
    let _ = fs::remove_dir_all(dir.join(TB_DIR));
    let mut w = TensorBoardWriter::new(dir).unwrap();
    write_demo(&mut w);
    eprintln!("wrote {}", w.path().display());
}

#[test]
fn two_writers_in_one_second_get_distinct_files() {
    let run = std::env::temp_dir().join(format!("ferrotune-report-tb2-{}", std::process::id()));
    let _ = fs::remove_dir_all(&run);
    let a = TensorBoardWriter::new(&run).unwrap();
    let b = TensorBoardWriter::new(&run).unwrap();
    assert_ne!(a.path(), b.path());
    assert_eq!(fs::read_dir(run.join(TB_DIR)).unwrap().count(), 2);
}

#[test]
fn run_log_resume_trims_jsonl_and_marks_tensorboard() {
    use ferrotune_report::{read_metrics, RunLog, METRICS_FILE};
    let run = std::env::temp_dir().join(format!("ferrotune-report-runlog-{}", std::process::id()));
    let _ = fs::remove_dir_all(&run);
    let mut log = RunLog::new(&run, true).unwrap();
    for step in 1..=5u64 {
        log.log(step, &[("loss", step as f64)]).unwrap();
    }
    drop(log);
    let mut log = RunLog::resume(&run, 3, true).unwrap();
    log.log(4, &[("loss", 40.0)]).unwrap();
    let steps: Vec<u64> = read_metrics(&run.join(METRICS_FILE))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let second = log.tensorboard.as_ref().unwrap().path().to_path_buf();
    let events: Vec<Decoded> = read_records(&fs::read(&second).unwrap())
        .iter()
        .map(|r| decode_event(r).1)
        .collect();
    assert_eq!(events[0], Decoded::FileVersion("brain.Event:2".into()));
    assert_eq!(events[1], Decoded::Start { step: 4 });
    assert_eq!(
        events[2],
        Decoded::Scalar {
            step: 4,
            tag: "loss".into(),
            value: 40.0
        }
    );
    assert_eq!(fs::read_dir(run.join(TB_DIR)).unwrap().count(), 2);
}
