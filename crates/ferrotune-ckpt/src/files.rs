//! Durable file primitives the rest of the room builds on: create-new writes that are fsynced,
//! safetensors writes that keep the caller's tensor order, directory fsync, and the
//! "write into a hidden sibling, then rename" commit that makes a folder appear whole or not at
//! all. Owns no layout decisions (which file goes where is `checkpoint.rs` / `export.rs`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{io, CkptError, Result};

/// safetensors metadata key under which we record the caller's tensor order (the format itself
/// stores tensors sorted by dtype/name, so order would otherwise be lost).
const ORDER_KEY: &str = "ferrotune.order";

/// Write `bytes` to a file that must not exist yet, and fsync it. Never truncates: an existing
/// file is an error, so nothing is ever overwritten in place.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Pretty JSON + trailing newline, written with [`write_new`].
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| CkptError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_new(path, text.as_bytes())
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| CkptError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Write named tensors as safetensors (with `{"format": "pt"}` metadata, which transformers
/// and PEFT expect, and our order record), then fsync. The file must not exist yet.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let st_err = |msg: String| CkptError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut seen = HashSet::new();
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(st_err(format!("tensor name `{name}` given twice")));
        }
        // candle's safetensors view unwraps its device copy; do it here where errors propagate.
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        host.push((name.clone(), t));
    }
    if path.exists() {
        return Err(CkptError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        });
    }
    let order: Vec<&str> = host.iter().map(|(n, _)| n.as_str()).collect();
    let order = serde_json::to_string(&order).map_err(|e| st_err(e.to_string()))?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (ORDER_KEY.to_string(), order),
    ]);
    safetensors::serialize_to_file(
        host.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| st_err(e.to_string()))?;
    canonical_header(path).map_err(|e| st_err(format!("rewriting the header: {e}")))?;
    // The safetensors writer creates the file owner-only; weights are meant to be shared like
    // every other file we write.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Rewrite a safetensors header with its top-level keys and `__metadata__` keys sorted, in
/// place and at the same length: the writer serialises hash maps in random order, so equal
/// tensors would otherwise give files that differ byte for byte.
fn canonical_header(path: &Path) -> std::result::Result<(), String> {
    use std::collections::BTreeMap;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| e.to_string())?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; n];
    f.read_exact(&mut buf).map_err(|e| e.to_string())?;
    let top: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(buf.trim_ascii_end()).map_err(|e| e.to_string())?;
    let mut top = top;
    if let Some(serde_json::Value::Object(m)) = top.get("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let v = serde_json::to_value(sorted).map_err(|e| e.to_string())?;
        top.insert("__metadata__".into(), v);
    }
    let mut out = serde_json::to_vec(&top).map_err(|e| e.to_string())?;
    if out.len() > n {
        return Err(format!(
            "canonical header is {} bytes, the file has {n}",
            out.len()
        ));
    }
    out.resize(n, b' ');
    f.seek(SeekFrom::Start(8)).map_err(|e| e.to_string())?;
    f.write_all(&out).map_err(|e| e.to_string())
}

/// Read a safetensors file back as `(name, tensor)` in the order it was written by
/// [`write_safetensors`] (sorted by name for files written by others).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let st_err = |msg: String| CkptError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = fs::read(path).map_err(io(path))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| st_err(e.to_string()))?;
    let mut map =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| st_err(e.to_string()))?;
    let order: Option<Vec<String>> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(ORDER_KEY))
        .and_then(|s| serde_json::from_str(s).ok());
    let mut names: Vec<String> = match order {
        Some(o) if o.len() == map.len() && o.iter().all(|n| map.contains_key(n)) => o,
        _ => {
            let mut n: Vec<String> = map.keys().cloned().collect();
            n.sort();
            n
        }
    };
    Ok(names
        .drain(..)
        .filter_map(|n| map.remove(&n).map(|t| (n, t)))
        .collect())
}

/// fsync a directory so that the entries created or renamed in it survive a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Copy `from` to the new file `to` and fsync it.
pub fn copy_new(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).map_err(io(from))?;
    write_new(to, &bytes)
}

/// The names in a folder (files and folders), sorted; empty when it does not exist.
pub fn entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        v.push(e.file_name().to_string_lossy().into_owned());
    }
    v.sort();
    Ok(v)
}

/// The folder holding `path`: its parent, or `.` for a bare relative name (whose parent is the
/// empty path, which no file call accepts).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden sibling of `target` to build it in: `<parent>/.<name>.<tag>`.
pub fn staging_sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    parent_dir(target).join(format!(".{name}.{tag}"))
}

/// Rename a finished staging folder onto `target` (which must not exist, or be an empty
/// folder), then fsync the parent so the rename is durable.
pub fn commit_dir(staging: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        // An empty folder is replaced; anything else is never overwritten.
        fs::remove_dir(target).map_err(io(target))?;
    }
    fs::rename(staging, target).map_err(io(target))?;
    sync_dir(parent_dir(target))
}
