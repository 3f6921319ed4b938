//! A run's checkpoints: where the run is ([`Progress`]: step, losses, data order, PPO's KL
//! coefficient) and the fingerprint of what it depends on, saved beside each device's pieces of
//! the trainable weights (and the frozen ones no file names) and of the optimizer's moments
//! (`store::sharded`), and loaded back only into the experiment and data they belong to.

use crate::parallel::mesh::{DevicePieces, Mesh};
use crate::rng::Rng;
use crate::store::run_dir::{
    partial_checkpoint, write_checkpoint_file, Checkpoint, FileDigest, RunDir, StoreError,
};
use crate::store::sharded::{file_bytes, saved_moments, saved_weights, Kind};
use crate::tensor::{param_shape, HostTensor};
use crate::train::loss_scale::LossScale;
use crate::train::optim::State;
use crate::train::RunError;
use kiln_compiler::graph::{Graph, Param};
use kiln_compiler::spec::Experiment;
use std::collections::BTreeMap;
use std::path::Path;

/// Where a run is: enough to continue it bit-exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Progress {
    /// Steps completed.
    pub(crate) step: u64,
    /// The steps the run was to take when this was saved (a later stage starts only from a
    /// finished run).
    #[serde(default)]
    pub(crate) total: Option<u64>,
    pub(super) loss: f32,
    pub(super) first_loss: f32,
    /// The data order's generator, the current epoch's order and the position in it.
    rng: u64,
    order: Vec<usize>,
    cursor: usize,
    pub(super) tokens: usize,
    /// PPO's KL coefficient under an adaptive controller (`kl_target`), as it has moved.
    #[serde(default)]
    pub(super) kl_coef: Option<f64>,
    /// fp16's dynamic loss scale, as it stood after the step.
    #[serde(default)]
    pub(super) loss_scale: Option<LossScale>,
    /// Fingerprint of everything that must not change between a run and its resumption.
    fingerprint: String,
}

impl Progress {
    /// The start of a run of `e` on `records` training records (the first epoch's shuffle is
    /// drawn at the first record).
    pub(super) fn start(e: &Experiment, records: usize) -> Self {
        Progress {
            step: 0,
            total: None,
            loss: f32::NAN,
            first_loss: f32::NAN,
            rng: e.train.seed,
            order: (0..records).collect(),
            cursor: records,
            tokens: 0,
            kl_coef: None,
            loss_scale: None,
            fingerprint: fingerprint(e),
        }
    }

    /// The next training record, in a fresh seeded shuffle each epoch.
    pub(super) fn next_record(&mut self) -> usize {
        if self.cursor == self.order.len() {
            let mut rng = Rng(self.rng);
            for i in (1..self.order.len()).rev() {
                self.order.swap(i, rng.below(i + 1));
            }
            self.rng = rng.0;
            self.cursor = 0;
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }
}

/// FNV-1a over the parts of the experiment a checkpoint depends on (not the step count, which a
/// resumed run may extend).
fn fingerprint(e: &Experiment) -> String {
    // The mesh is left out: a run may move to another mesh, its numbers differing in the last
    // bits only (random draws follow each row's place in the step, not the device: `rng`).
    let relevant = serde_json::json!({
        "model": e.model, "adapters": e.adapters, "objective": e.objective, "data": e.data,
        "optimizer": e.train.optimizer, "schedule": e.train.schedule, "batch": e.train.batch,
        "micro_batch": e.train.micro_batch, "seq_len": e.train.seq_len, "seed": e.train.seed,
        "grad_clip": e.train.grad_clip, "precision": e.train.precision, "init": e.init,
    });
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relevant.to_string().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub(crate) const STATE_FILE: &str = "state.json";

/// The frozen parameters a checkpoint must hold itself: those of a model defined in Kiln, which
/// no file names (their values came from a seed, or from the stage the run started from), so
/// that a later stage, an export or a reader of the checkpoint gets the model the run trained
/// rather than a re-initialisation. PPO's reference copy is derived, not stored.
pub(super) fn unsourced_frozen(e: &Experiment, g: &Graph) -> Vec<usize> {
    if e.model.checkpoint.is_some() {
        return Vec::new();
    }
    (0..g.params.len())
        .filter(|&i| !g.params[i].trainable && !g.params[i].is_reference_copy())
        .collect()
}

/// Saves the run's checkpoint: every device writes its pieces of the trainable weights (and of
/// the `frozen` ones no file names) and of the optimizer's moments, and the process owning the
/// run directory (`dir`, rank 0's) adds the progress and the manifest of every process's files
/// and puts the checkpoint in place. Every process of a job calls this together with the
/// others; they all see the run directory `run` (a filesystem they share, across machines).
pub(super) fn save_checkpoint(
    g: &Graph,
    mesh: &mut Mesh,
    progress: &Progress,
    run: &Path,
    dir: Option<&RunDir>,
    keep: u64,
    frozen: &[usize],
) -> Result<(), RunError> {
    let step = progress.step;
    let opened = dir.map(|dir| dir.begin(step)).transpose();
    let in_place = matches!(opened, Ok(Some(None)));
    let [cannot_open, in_place] = mesh.anyone([opened.is_err(), in_place])?;
    opened?;
    if cannot_open {
        return Err(RunError(format!(
            "rank 0 cannot start the checkpoint of step {step} (its message says why)"
        )));
    }
    if in_place {
        return Ok(());
    }

    // Each file's digest travels to the owner in its slot: present flag, then the digest. The
    // last value counts the processes that could not write theirs.
    let partial = partial_checkpoint(run, step);
    let saved: Vec<bool> = (0..g.params.len())
        .map(|i| g.params[i].trainable || frozen.contains(&i))
        .collect();
    let devices = mesh.devices();
    let mut words = vec![0.0; digest_slot(devices, Kind::Weights) + 1];
    let mut failure = None;
    for DevicePieces { device, files } in mesh.pieces(g, &saved) {
        for (kind, pieces) in files.iter().filter(|(_, p)| !p.is_empty()) {
            let name = kind.file_name(device, devices);
            let written = file_bytes(pieces)
                .map_err(StoreError)
                .and_then(|bytes| write_checkpoint_file(&partial, &name, &bytes));
            match written {
                Ok(digest) => {
                    let at = digest_slot(device, *kind);
                    words[at] = 1.0;
                    words[at + 1..at + 1 + FileDigest::WORDS].copy_from_slice(&digest.to_words());
                }
                Err(err) => failure = Some(err),
            }
        }
    }
    if failure.is_some() {
        *words.last_mut().expect("the failure count") = 1.0;
    }
    mesh.share_over_job(&mut words)?;
    if let Some(err) = failure {
        // A process other than the owner writes into the directory the owner made.
        let shared = match dir {
            Some(dir) => {
                dir.abandon(step);
                String::new()
            }
            None => format!(
                "; every process of a job writes its part into {}, which they must share (across machines, a shared filesystem)",
                run.display()
            ),
        };
        return Err(RunError(format!(
            "cannot save the checkpoint of step {step}: {err}{shared}; the previous checkpoint is intact"
        )));
    }
    if words.last().is_some_and(|&failed| failed > 0.0) {
        dir.inspect(|dir| dir.abandon(step));
        return Err(RunError(format!(
            "another process could not write its part of the checkpoint of step {step} (its message says why); the previous checkpoint is intact"
        )));
    }

    let committed = match dir {
        Some(dir) => {
            commit(dir, progress, &words, devices, keep).inspect_err(|_| dir.abandon(step))
        }
        None => Ok(()),
    };
    // Nobody goes on (nor saves again) before the checkpoint is in place or known lost: every
    // process reaches this agreement, whatever failed before it on the owner.
    let [lost] = mesh.anyone([committed.is_err()])?;
    committed?;
    if lost {
        return Err(RunError(format!(
            "rank 0 could not put the checkpoint of step {step} in place (its message says why); the previous checkpoint is intact"
        )));
    }
    Ok(())
}

/// Where device `device`'s file of `kind` reports its digest in the exchange: a present flag,
/// then the digest's words.
fn digest_slot(device: usize, kind: Kind) -> usize {
    (device * Kind::ALL.len() + kind as usize) * (1 + FileDigest::WORDS)
}

/// The owner's part of a save: the files every process reported (`words`), the progress and
/// the manifest, the checkpoint put in place.
fn commit(
    dir: &RunDir,
    progress: &Progress,
    words: &[f32],
    devices: usize,
    keep: u64,
) -> Result<(), RunError> {
    let mut written = BTreeMap::new();
    for device in 0..devices {
        for kind in Kind::ALL {
            let at = digest_slot(device, kind);
            if words[at] == 0.0 {
                continue;
            }
            let digest = FileDigest::from_words(&words[at + 1..]).ok_or_else(|| {
                RunError(format!(
                    "the digest of device {device}'s checkpoint file did not arrive whole"
                ))
            })?;
            written.insert(kind.file_name(device, devices), digest);
        }
    }
    let state = serde_json::to_vec_pretty(progress)
        .map_err(|e| RunError(format!("cannot write the state: {e}")))?;
    dir.commit(
        progress.step,
        written,
        &[(STATE_FILE, state.as_slice())],
        keep as usize,
    )?;
    Ok(())
}

/// Restores weights, moments and progress from a verified checkpoint, refusing one that does
/// not belong to this experiment and data: every trainable tensor with its shape, moments of
/// the same shapes, and a data position inside the training set. The checkpoint may come from
/// any mesh: its pieces are put back together whole, for the mesh to deal out anew.
pub(super) fn load_checkpoint(
    g: &Graph,
    values: &mut [HostTensor],
    states: &mut [Option<State>],
    checkpoint: &Checkpoint,
    e: &Experiment,
    train_records: usize,
) -> Result<Progress, RunError> {
    let dir = &checkpoint.dir;
    let refuse = |what: String| RunError(format!("cannot resume from {}: {what}", dir.display()));
    let progress: Progress = serde_json::from_slice(checkpoint.file(STATE_FILE)?)
        .map_err(|err| refuse(format!("{STATE_FILE} is damaged: {err}")))?;
    if progress.fingerprint != fingerprint(e) {
        return Err(refuse(
            "the experiment changed since that checkpoint (model, adapters, objective, data, optimizer, schedule, batch, sequence length, seed, gradient clipping, precision or the stage it starts from); start a new run (--restart), or restore the experiment".into(),
        ));
    }
    if progress.step != checkpoint.step {
        return Err(refuse(format!(
            "its state is of step {}, its manifest of step {}",
            progress.step, checkpoint.step
        )));
    }
    check_data_position(&progress, train_records).map_err(refuse)?;
    let weights = saved_weights(checkpoint)?;
    let moments = saved_moments(checkpoint)?;
    for (i, p) in g.params.iter().enumerate().filter(|(_, p)| p.trainable) {
        values[i] = shaped(&weights, &p.name, p)
            .map_err(refuse)?
            .ok_or_else(|| refuse(format!("it has no weights of `{}`", p.name)))?
            .clone();
        let m = shaped(&moments, &format!("{}.exp_avg", p.name), p);
        let v = shaped(&moments, &format!("{}.exp_avg_sq", p.name), p);
        let (m, v) = (m.map_err(refuse)?, v.map_err(refuse)?);
        states[i] = match (m, v) {
            (Some(m), Some(v)) => Some(State {
                m: m.data.clone(),
                v: v.data.clone(),
            }),
            // No step has updated it yet (moments appear with the first update).
            (None, None) => None,
            _ => {
                return Err(refuse(format!(
                    "it has one of `{0}`'s two optimizer moments (exp_avg, exp_avg_sq)",
                    p.name
                )))
            }
        };
    }
    Ok(progress)
}

/// The checkpoint's tensor `key`, which must have parameter `p`'s shape; `None` when absent.
fn shaped<'t>(
    tensors: &'t BTreeMap<String, HostTensor>,
    key: &str,
    p: &Param,
) -> Result<Option<&'t HostTensor>, String> {
    let expected = param_shape(p);
    match tensors.get(key) {
        Some(t) if t.shape == expected => Ok(Some(t)),
        Some(t) => Err(format!(
            "its `{key}` has shape {:?}; the experiment's `{}` is {expected:?}",
            t.shape, p.name
        )),
        None => Ok(None),
    }
}

/// A saved data position must index the training set as loaded now.
fn check_data_position(progress: &Progress, records: usize) -> Result<(), String> {
    let order = &progress.order;
    if order.len() != records {
        return Err(format!(
            "its data order covers {} records and the training set has {records}; did the data file change?",
            order.len()
        ));
    }
    if progress.cursor > order.len() {
        return Err(format!(
            "its data position {} is past the {} records",
            progress.cursor,
            order.len()
        ));
    }
    let mut seen = vec![false; records];
    for &i in order {
        if i >= records || std::mem::replace(&mut seen[i], true) {
            return Err(format!(
                "its data order is not an order of the {records} records (entry {i})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(order: Vec<usize>, cursor: usize) -> Progress {
        Progress {
            step: 1,
            total: None,
            loss: 0.0,
            first_loss: 0.0,
            rng: 0,
            order,
            cursor,
            tokens: 0,
            kl_coef: None,
            loss_scale: None,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn a_saved_data_position_must_index_the_training_set() {
        assert!(check_data_position(&progress(vec![2, 0, 1], 3), 3).is_ok());
        let refused = |p: Progress, records| check_data_position(&p, records).unwrap_err();
        assert!(refused(progress(vec![0, 1], 1), 3).contains("covers 2 records"));
        assert!(refused(progress(vec![0, 1, 2], 4), 3).contains("past the 3 records"));
        assert!(refused(progress(vec![0, 3, 1], 0), 3).contains("entry 3"));
        assert!(refused(progress(vec![0, 1, 1], 0), 3).contains("entry 1"));
    }
}
