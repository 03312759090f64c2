//! Dataset preparation and the cached semantic artifacts of LLM-ESR.
//!
//! This crate turns raw interaction files into a prepared dataset (filtered,
//! ids remapped to 1..N, time-ordered sequences, item text, statistics and
//! long-tail groups; [`prepare`]) and computes, once, the semantic inputs the
//! model reads: the item embeddings `E_se` and user embeddings `U_llm` from a
//! local BERT-family sentence encoder (or imported from `.npy`/`.safetensors`),
//! the PCA initialisation of the collaborative table and the similar-user lists
//! ([`artifacts::embed`]); it also loads and checks them for the trainer
//! ([`artifacts::Artifacts::load`]). What it is not: it does no training, no
//! evaluation and no distribution, holds no model of the recommender, and never
//! runs during training or inference; it reads local files only (no network,
//! no downloads). candle comes through `llm-esr-runtime`.
//!
//! One module per concern: [`prepare`] (raw files -> dataset), [`dataset`]
//! (reading a prepared dataset), [`split`] (the leave-one-out split),
//! [`long_tail`] (head/tail groups), [`prompts`] (item and user prompts),
//! [`encoder`] (the sentence encoder), [`import`] (external vectors), [`pca`],
//! [`knn`], [`artifacts`] (the embed stage, the manifest and the loader);
//! [`table`], [`fsutil`], [`device`], [`finite`], [`memory`] and [`invalid`]
//! are helpers (delimited files; atomic writes, hashes, progress bars; the
//! `cpu`/`cuda`/`cuda:N` device of a config key; NaN and infinity checks of
//! loaded tensors; available memory; configuration errors).

pub mod artifacts;
pub mod dataset;
pub mod device;
pub mod encoder;
pub mod finite;
pub mod fsutil;
pub mod import;
pub mod invalid;
pub mod knn;
pub mod long_tail;
pub mod memory;
pub mod pca;
pub mod prepare;
pub mod prompts;
pub mod split;
pub mod table;

pub use artifacts::{embed, ArtifactSummary, Artifacts, EmbedConfig, Manifest};
pub use dataset::{Dataset, DatasetSummary, ItemText};
pub use device::parse_device;
pub use encoder::SentenceEncoder;
pub use import::ImportSpec;
pub use invalid::{invalid_config, is_invalid_config, InvalidConfig};
pub use long_tail::{long_tail, LongTail, LongTailConfig, LongTailSummary, TestUserLength};
pub use prepare::{prepare, InputFormat, KCore, PrepareConfig};
pub use split::train_part;
