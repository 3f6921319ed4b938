//! Training, by concern:
//!
//! - `run`: the loop — data and starting weights, steps on the mesh the plan lays out
//!   (`parallel::mesh`), the learning-rate schedule, metrics, checkpoints and the loss curve;
//! - `evaluate`: the evaluation loss (and accuracy) over `data.eval`, or PPO's mean reward;
//! - `ppo`: PPO's rollouts (sampling, rewards, advantages) and its updates on them;
//! - `optim`: optimizers, gradient clipping and learning-rate schedules;
//! - `init`: fresh parameter values, as the reference implementations initialise them;
//! - `checkpoint`: where a run is, saved with its weights and moments (`store::run_dir`:
//!   complete or absent) and verified on resume;
//! - `plot`: the loss curve.
//!
//! What a step trains on comes from the objective's data side ([`crate::data::TaskData`]); this
//! module holds what the loop tells its caller and what the loop and evaluation share.

pub(crate) mod checkpoint;
mod evaluate;
mod init;
pub mod loss_scale;
pub mod optim;
pub mod plot;
pub mod ppo;
mod run;

pub use init::initialise;
pub use run::run;

use crate::data::{DataError, Inputs};
use crate::exec::{label_counts, Batch};
use crate::parallel::mesh::DeviceMemory;
use crate::store::run_dir::StoreError;
use crate::train::ppo::Rollouts;
use kiln_compiler::graph::Graph;
use kiln_compiler::spec::Ppo;
use petgraph::graph::NodeIndex;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why a run cannot start or go on.
#[derive(Debug)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunError {}

impl From<DataError> for RunError {
    fn from(e: DataError) -> Self {
        RunError(e.0)
    }
}

impl From<crate::comm::CollectiveError> for RunError {
    fn from(e: crate::comm::CollectiveError) -> Self {
        RunError(e.0)
    }
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        RunError(e.0)
    }
}

/// How a run begins when its directory may already hold a run of the experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused when the directory holds a checkpoint (nothing is overwritten).
    Fresh,
    /// Continue from the newest checkpoint, bit-exactly; from the beginning when there is none.
    Resume,
    /// Discard the directory's run (checkpoints and metrics) and start over.
    Restart,
}

/// Which devices execute a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devices {
    /// The ones it is planned for: this machine's CPU threads for a `cpu(N)` mesh, its GPUs
    /// for a plan for GPUs (refused, naming the GPUs it has, when it has too few).
    Planned,
    /// CPU threads, one per planned device, whatever the mesh (`--emulate`): the numbers the
    /// plan computes, not its devices' speed.
    CpuThreads,
}

/// What the loop tells its caller, which answers whether to go on.
pub enum Event<'a> {
    /// Training is about to begin: at `resumed_from` (a checkpoint's step), with `initialised`
    /// the parameters that started from fresh values though a checkpoint was named (task heads
    /// a bare model's checkpoint lacks; with `init_missing`, whatever it lacks).
    Started {
        resumed_from: Option<u64>,
        total: u64,
        initialised: &'a [String],
        /// The GPUs it trains on (none: CPU threads).
        gpus: &'a [String],
    },
    Step(&'a StepReport),
    Evaluated {
        step: u64,
        loss: f32,
    },
}

/// What a caller sees of each step (for a progress bar).
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f32,
    pub tokens_per_second: f64,
    /// Seconds a device spent in collectives and transfers during the step (mean over devices).
    pub collective_seconds: f64,
}

/// What to do after a step.
pub enum Control {
    Continue,
    /// Save a checkpoint and stop (as on an interrupt).
    Stop,
}

#[derive(Debug)]
pub struct RunSummary {
    /// Whether the loss is a per-token cross-entropy (so that perplexity means something).
    pub token_loss: bool,
    /// Steps done, of `total` (fewer when the run was stopped).
    pub steps: u64,
    pub total: u64,
    /// The checkpoint's step a resumed run started from.
    pub resumed_from: Option<u64>,
    pub first_loss: f32,
    pub last_loss: f32,
    pub eval_loss: Option<f32>,
    /// Share of evaluation rows classified right (PET).
    pub eval_accuracy: Option<f32>,
    pub tokens_per_second: f64,
    pub run_dir: PathBuf,
    /// Each device's measured peak memory beside the plan's prediction (also written to
    /// `memory.json`); empty when the program does not count allocations.
    pub memory: Vec<DeviceMemory>,
}

/// Makes the cross-entropies of `batches`, the parts of one loss weighing `shares` in it, the
/// mean over all of their labelled positions: each part divides its sum by its share of the
/// count over them all. (A mean per part would weigh a position by how few others share its
/// part: the loss would depend on how a step is cut into microbatches.)
fn share_label_counts(g: &Graph, batches: &mut [Batch], shares: &[f64]) -> Result<(), RunError> {
    let mut total: BTreeMap<NodeIndex, f64> = BTreeMap::new();
    for b in batches.iter() {
        let counts = label_counts(g, b).map_err(|err| RunError(err.0))?;
        for (n, count) in counts {
            *total.entry(n).or_default() += count;
        }
    }
    for (b, share) in batches.iter_mut().zip(shares) {
        b.label_counts = total
            .iter()
            .map(|(&n, &count)| (n, (count * share) as f32))
            .collect();
    }
    Ok(())
}

/// What each step trains on, as the objective's data feeds it ([`crate::data::Feed`]): batches
/// of the training set's examples, or PPO's rollouts sampled after its prompts.
enum Steps<'a> {
    Batches(Inputs<'a>),
    Rollouts(&'a Ppo, Box<Rollouts<'a>>),
}
