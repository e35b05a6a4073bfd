//! The binary's commands, one file per family: `args` (the clap definitions), `train`
//! (train, pretrain), `infer` (generate, perplexity, tokenize, export, bench), `evaluate` (eval, compare),
//! `gen` (data gen). `main.rs` matches the command and calls one function here.

pub mod args;
pub mod evaluate;
pub mod gen;
pub mod infer;
pub mod train;
