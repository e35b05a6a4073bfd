//! `RunLog`: the one call a trainer makes per step to record metrics — the JSONL line and the
//! TensorBoard scalars together, trimmed/marked consistently on resume. Owns only that pairing;
//! the formats themselves live in `metrics` and `tensorboard`.

use std::path::Path;

use crate::error::Result;
use crate::metrics::MetricsWriter;
use crate::tensorboard::TensorBoardWriter;

/// Metrics JSONL plus (optionally) a TensorBoard event file for one run folder.
#[derive(Debug)]
pub struct RunLog {
    pub metrics: MetricsWriter,
    pub tensorboard: Option<TensorBoardWriter>,
}

impl RunLog {
    /// Fresh run: empties `metrics.jsonl`, starts a new event file when `tensorboard`.
    pub fn new(run_dir: &Path, tensorboard: bool) -> Result<Self> {
        let metrics = MetricsWriter::new(run_dir)?;
        let tensorboard = tensorboard
            .then(|| TensorBoardWriter::new(run_dir))
            .transpose()?;
        Ok(Self {
            metrics,
            tensorboard,
        })
    }

    /// Resumed run: drops JSONL records after `resumed_step` and starts a new event file whose
    /// first event tells TensorBoard to discard the old file's points after `resumed_step`.
    pub fn resume(run_dir: &Path, resumed_step: u64, tensorboard: bool) -> Result<Self> {
        let metrics = MetricsWriter::resume(run_dir, resumed_step)?;
        let tensorboard = match tensorboard {
            true => {
                let mut tb = TensorBoardWriter::new(run_dir)?;
                tb.mark_resume(resumed_step)?;
                Some(tb)
            }
            false => None,
        };
        Ok(Self {
            metrics,
            tensorboard,
        })
    }

    /// Records one step's values in both sinks (each flushed before returning).
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        self.metrics.log(step, values)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.add_scalars(step, values)?;
        }
        Ok(())
    }

    /// Records a text sample (e.g. a completion) in TensorBoard; JSONL stays numeric-per-step.
    pub fn text(&mut self, tag: &str, text: &str, step: u64) -> Result<()> {
        match &mut self.tensorboard {
            Some(tb) => tb.add_text(tag, text, step),
            None => Ok(()),
        }
    }
}
