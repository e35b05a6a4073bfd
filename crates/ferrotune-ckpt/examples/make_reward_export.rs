//! Writes fixtures/reward/ferrotune_export/ (our merged reward-model export) and
//! fixtures/reward/ferrotune_adapter/ (the same model as a PEFT SEQ_CLS adapter), which
//! `fixtures/reward/make_reward_fixture.py export` loads with transformers'
//! `AutoModelForSequenceClassification` and PEFT to record the scores the Rust test compares with.
//! Run from anywhere: `cargo run -p ferrotune-ckpt --example make_reward_export`.
//! The test `reward_export::committed_export_loads_in_transformers_with_the_same_scores` checks
//! the committed folders still equal what this writes.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/reward_common/mod.rs"]
mod reward_common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let export = reward_common::reward_fixtures().join("ferrotune_export");
    let adapter = reward_common::reward_fixtures().join("ferrotune_adapter");
    for dir in [&export, &adapter] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
    }
    let rm = reward_common::export_fixture_model();
    let report = ferrotune_ckpt::export_reward_model(&rm, &export, candle_core::DType::F32)?;
    println!(
        "wrote {} ({} tensors, {} merged): {:?}",
        export.display(),
        report.tensors,
        report.merged.len(),
        report.files
    );
    ferrotune_ckpt::save_reward_adapter(
        &rm,
        &reward_common::lora(),
        reward_common::ADAPTER_BASE,
        &adapter,
    )?;
    println!("wrote {}", adapter.display());
    Ok(())
}
