//! The verified loader of the artifacts for the trainer: every file must be
//! the one `embed` wrote (its sha256 in the manifest), every shape must fit
//! the dataset and every float must be finite.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor};

use super::manifest::Manifest;
use super::tensors::load_tensor;
use super::{ITEM_EMB_FILE, MANIFEST_FILE, NEIGHBOURS_FILE, PCA_FILE, USER_EMB_FILE};
use crate::fsutil::sha256_file;

/// The artifacts, loaded and checked against the dataset.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `E_se`: `(items + 1, D)` f32, row 0 zeros.
    pub item_emb: Tensor,
    /// `U_llm`: `(users, D_u)` f32, row 0 = user 1; `None` when the file is absent.
    pub user_emb: Option<Tensor>,
    /// PCA init of `E_co`: `(items + 1, pca_dim)` f32, row 0 zeros.
    pub pca: Tensor,
    /// Similar users: `(users, K)` u32, 0-based user rows, best first.
    pub neighbours: Tensor,
    /// Their cosine similarities: `(users, K)` f32.
    pub neighbour_scores: Tensor,
    /// The manifest.
    pub manifest: Manifest,
}

impl Artifacts {
    /// Loads the artifacts in `dir` onto `device`, checking every shape against
    /// the dataset (`expected_items` items, `expected_users` users). Errors name
    /// the file and say to rerun `llm-esr-orch embed CONFIG`.
    pub fn load(
        dir: &Path,
        expected_items: usize,
        expected_users: usize,
        device: &Device,
    ) -> Result<Artifacts> {
        let rerun = "rerun `llm-esr-orch embed CONFIG`";
        let manifest = Manifest::load(dir)?;
        if manifest.dataset.items != expected_items || manifest.dataset.users != expected_users {
            bail!(
                "{}: the artifacts were built for {} items and {} users, the dataset has {} items \
                 and {} users; {rerun}",
                dir.join(MANIFEST_FILE).display(),
                manifest.dataset.items,
                manifest.dataset.users,
                expected_items,
                expected_users
            );
        }
        let check = |path: &Path,
                     name: &str,
                     t: &Tensor,
                     rows: usize,
                     cols: Option<usize>,
                     dtype: DType|
         -> Result<()> {
            let dims = t.dims();
            let ok = dims.len() == 2
                && dims[0] == rows
                && cols.is_none_or(|c| dims[1] == c)
                && t.dtype() == dtype;
            if !ok {
                bail!(
                    "{}: tensor `{name}` has shape {:?} ({:?}) but the dataset needs ({rows}, {}) \
                     ({dtype:?}); {rerun}",
                    path.display(),
                    dims,
                    t.dtype(),
                    cols.map(|c| c.to_string()).unwrap_or_else(|| "D".into())
                );
            }
            Ok(())
        };
        // Every file must be the one `embed` wrote (its sha256 in the
        // manifest), and every float in it finite.
        let verified = |file: &str| -> Result<PathBuf> {
            let p = dir.join(file);
            verify_output(&manifest, dir, file)?;
            Ok(p)
        };
        let finite = |p: &Path, name: &str, t: &Tensor| {
            crate::finite::ensure_finite(
                t,
                &format!("{}: tensor `{name}`", p.display()),
                &format!("{rerun} --force"),
            )
        };
        let p = verified(ITEM_EMB_FILE)?;
        let item_emb = load_tensor(&p, "item_emb", device)?;
        finite(&p, "item_emb", &item_emb)?;
        check(
            &p,
            "item_emb",
            &item_emb,
            expected_items + 1,
            None,
            DType::F32,
        )?;
        let p = dir.join(USER_EMB_FILE);
        let user_emb = if p.exists() {
            let p = verified(USER_EMB_FILE)?;
            let u = load_tensor(&p, "user_emb", device)?;
            check(&p, "user_emb", &u, expected_users, None, DType::F32)?;
            finite(&p, "user_emb", &u)?;
            Some(u)
        } else {
            None
        };
        let p = verified(PCA_FILE)?;
        let pca = load_tensor(&p, "pca", device)?;
        check(&p, "pca", &pca, expected_items + 1, None, DType::F32)?;
        finite(&p, "pca", &pca)?;
        let p = verified(NEIGHBOURS_FILE)?;
        let neighbours = load_tensor(&p, "indices", &Device::Cpu)?;
        check(&p, "indices", &neighbours, expected_users, None, DType::U32)?;
        let k = neighbours.dims()[1];
        let scores = load_tensor(&p, "scores", device)?;
        check(&p, "scores", &scores, expected_users, Some(k), DType::F32)?;
        finite(&p, "scores", &scores)?;
        let flat: Vec<u32> = neighbours.flatten_all()?.to_vec1()?;
        for (pos, &j) in flat.iter().enumerate() {
            let row = pos.checked_div(k).unwrap_or(0);
            if j as usize >= expected_users || j as usize == row {
                bail!(
                    "{}: neighbour {j} of user row {row} is out of range or the user itself; {rerun}",
                    p.display()
                );
            }
        }
        let neighbours = neighbours.to_device(device)?;
        Ok(Artifacts {
            item_emb,
            user_emb,
            pca,
            neighbours,
            neighbour_scores: scores,
            manifest,
        })
    }
}

/// Fails unless `dir/file` has the sha256 that `embed` recorded for it: a
/// file edited, replaced or truncated since is not used.
fn verify_output(manifest: &Manifest, dir: &Path, file: &str) -> Result<()> {
    let path = dir.join(file);
    let rerun = "rerun `llm-esr-orch embed CONFIG` (with --force to recompute every stage)";
    let Some(entry) = manifest.stages.values().find(|e| e.file == file) else {
        bail!(
            "{}: {} records no stage that wrote {file}; {rerun}",
            path.display(),
            dir.join(MANIFEST_FILE).display()
        );
    };
    if !path.is_file() {
        bail!("{} is missing; {rerun}", path.display());
    }
    let actual = sha256_file(&path)?;
    if actual != entry.output_sha256 {
        bail!(
            "{} has changed since `embed` wrote it (sha256 {actual}, {} records {}); {rerun}",
            path.display(),
            dir.join(MANIFEST_FILE).display(),
            entry.output_sha256
        );
    }
    Ok(())
}
