//! The run folder: where one training run keeps everything it writes.
//!
//! ```text
//! <run>/
//!   ferrotune-run.json     marker: this folder is a ferrotune run (format version, created at)
//!   config.toml            the resolved run plan (written by the CLI)
//!   metrics.jsonl          one JSON object per step (written by `report`)
//!   tb/                    TensorBoard event files (written by `report`)
//!   plots/                 PNG/SVG plots (written by `report`)
//!   checkpoints/step-N/    complete checkpoints (see checkpoint.rs)
//!   completions.jsonl      sampled completions, by step (GRPO, PPO)
//!   health.jsonl           RL health findings, by step (GRPO)
//!   compare.json           `ferrotune compare` of the checkpoints
//!   ref_logps.json         DPO's precomputed reference log-probs (kept for resume)
//!   model/                 the distilled student (distill)
//! ```
//!
//! Owns: the layout, creating/opening it, and refusing to write a run over unrelated files.
//! Does not own: what goes into the files, or when to save.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{io, CkptError, Result};
use crate::files;

/// The file that marks a folder as a ferrotune run.
pub const RUN_MARKER: &str = "ferrotune-run.json";
/// Version of the run-folder layout written in the marker.
pub const RUN_FORMAT_VERSION: u64 = 1;

/// Entries a run owns; overwriting a run removes exactly these (and a distilled student's
/// `model/` folder, see [`RunDir::create`]), never anything else.
const RUN_OWNED: [&str; 10] = [
    RUN_MARKER,
    "config.toml",
    "metrics.jsonl",
    "tb",
    "plots",
    "checkpoints",
    "completions.jsonl",
    "health.jsonl",
    "compare.json",
    "ref_logps.json",
];

/// What `RunDir::create` does when the folder already has content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Fail when the folder is a run already or holds anything else.
    Refuse,
    /// Remove what a run owns (checkpoints, metrics, plots, ...) and start afresh; files a run
    /// does not own are left alone.
    Overwrite,
}

/// A run folder (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Start a new run in `path`: create it (or adopt an empty folder) and write the marker.
    /// A folder that is already a run, or that holds other files, is refused unless
    /// `on_existing` is [`OnExisting::Overwrite`].
    pub fn create(path: &Path, on_existing: OnExisting) -> Result<RunDir> {
        let existing = files::entries(path)?;
        if !existing.is_empty() {
            match on_existing {
                OnExisting::Overwrite => {
                    for name in RUN_OWNED {
                        remove_any(&path.join(name))?;
                    }
                    // The old run's distilled student; only a model folder, as distill writes.
                    let model = path.join("model");
                    if model.join("config.json").is_file() {
                        remove_any(&model)?;
                    }
                }
                OnExisting::Refuse if Self::is_run(path) => {
                    let run = RunDir {
                        root: path.to_path_buf(),
                    };
                    return Err(CkptError::RunExists {
                        path: path.to_path_buf(),
                        checkpoints: crate::checkpoint::complete_steps(&run)?.len(),
                    });
                }
                OnExisting::Refuse => {
                    let mut shown: Vec<String> = existing.iter().take(5).cloned().collect();
                    if existing.len() > 5 {
                        shown.push(format!("and {} more", existing.len() - 5));
                    }
                    return Err(CkptError::ForeignFolder {
                        path: path.to_path_buf(),
                        entries: shown,
                    });
                }
            }
        }
        fs::create_dir_all(path).map_err(io(path))?;
        let run = RunDir {
            root: path.to_path_buf(),
        };
        for dir in [run.checkpoints_dir(), run.tb_dir(), run.plots_dir()] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let marker = serde_json::json!({
            "format": "ferrotune-run",
            "version": RUN_FORMAT_VERSION,
            "created_unix": created,
        });
        // The marker goes last, so a folder that has it was fully laid out.
        files::write_json(&run.root.join(RUN_MARKER), &marker)?;
        files::sync_dir(&run.root)?;
        Ok(run)
    }

    /// Open an existing run (to resume it, or to read its checkpoints and metrics).
    pub fn open(path: &Path) -> Result<RunDir> {
        if !Self::is_run(path) {
            return Err(CkptError::NotARun {
                path: path.to_path_buf(),
                marker: RUN_MARKER,
            });
        }
        let run = RunDir {
            root: path.to_path_buf(),
        };
        let marker = run.root.join(RUN_MARKER);
        let v = files::read_json(&marker)?;
        match v.get("version").and_then(|v| v.as_u64()) {
            Some(ver) if ver <= RUN_FORMAT_VERSION => {}
            other => {
                return Err(CkptError::Unsupported {
                    path: marker,
                    msg: format!(
                    "run format version {other:?}; this ferrotune reads up to {RUN_FORMAT_VERSION}"
                ),
                })
            }
        }
        // Older runs may lack a folder created later in their life; recreate it.
        let cps = run.checkpoints_dir();
        fs::create_dir_all(&cps).map_err(io(&cps))?;
        Ok(run)
    }

    /// Whether `path` holds a run marker.
    pub fn is_run(path: &Path) -> bool {
        path.join(RUN_MARKER).is_file()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_toml(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn metrics_jsonl(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn tb_dir(&self) -> PathBuf {
        self.root.join("tb")
    }

    pub fn plots_dir(&self) -> PathBuf {
        self.root.join("plots")
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `checkpoints/step-N`: where the complete checkpoint of step N lives.
    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.checkpoints_dir().join(format!("step-{step}"))
    }

    /// Write (or replace) `config.toml` atomically: a new file is written beside it and
    /// renamed over it, so a reader sees the old or the new text, never a mix.
    pub fn write_config(&self, toml_text: &str) -> Result<()> {
        let path = self.config_toml();
        let tmp = self.root.join(".config.toml.tmp");
        remove_any(&tmp)?;
        files::write_new(&tmp, toml_text.as_bytes())?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        files::sync_dir(&self.root)
    }
}

/// Remove a file or folder if present.
pub(crate) fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io(p)),
        Ok(_) => fs::remove_file(p).map_err(io(p)),
        Err(_) => Ok(()),
    }
}
