//! The trainer's file readers, kept free of libtorch so that fuzzers and their corpus replay
//! build without it: datasets ([`data`]: AGIQA-3K, AIGCIQA2023's MAT files, CSV/JSONL manifests,
//! with validation) and the zip/pickle reader of `torch.save` / `torch.jit.save` archives
//! ([`torch_archive`]). `agiqa-trainer` re-exports both under their old paths
//! (`agiqa_trainer::data`, `agiqa_trainer::weights::torch_archive`).

pub mod data;
pub mod torch_archive;
