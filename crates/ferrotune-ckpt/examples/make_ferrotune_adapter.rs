//! Writes fixtures/ckpt/ferrotune_adapter/: the deterministic adapter that
//! fixtures/ckpt/make_ckpt_fixtures.py loads with PEFT (ferrotune -> PEFT interop fixture).
//! Run from anywhere: `cargo run -p ferrotune-ckpt --example make_ferrotune_adapter`.
//! The test `peft_interop::ferrotune_adapter_loads_in_peft` checks the committed folder still
//! equals what this writes.

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = common::ckpt_fixtures().join("ferrotune_adapter");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let model = common::ferrotune_adapter_model();
    ferrotune_ckpt::save_adapter(
        model.as_ref(),
        &common::llama_lora(),
        common::FERROTUNE_ADAPTER_BASE,
        &dir,
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}
