//! Gradients at the end of a step: summed over the data-parallel group (bucketed all-reduce, or
//! ZeRO's reduce-scatter), tied parameters and the loss over the stages, the global norm and
//! clipping, then the optimizer on what each device owns.

use super::schedule::{Grads, StepContext};
use super::{Across, Device, Failure, Links};
use crate::comm::{Collective, CollectiveError};
use crate::parallel::tensor_parallel::Shards;
use crate::tensor::{param_shape, HostTensor};
use crate::train::optim::{clip_factor, step};

/// Gradients are all-reduced in buckets of about this many values (4 MiB), so that no single
/// message holds the whole model.
const BUCKET_VALUES: usize = 1 << 20;

impl StepContext<'_> {
    /// Sums gradients (and the loss) over the data-parallel group: a bucketed all-reduce, or
    /// under ZeRO a reduce-scatter leaving each device its shard. Returns the summed loss.
    pub(super) fn sync_gradients(
        &self,
        stage: usize,
        links: &mut Links,
        grads: &mut Grads,
        loss: f32,
    ) -> Result<f32, Failure> {
        if self.placement.zero == 0 {
            return Ok(all_reduce_gradients(&mut *links.data, grads, loss)?);
        }
        if !self.partitioned_gradients(stage) {
            // ZeRO-1: last parameters first, as backward finishes them.
            for g in grads.iter_mut().rev().flatten() {
                links.data.reduce_scatter_sum(g)?;
                let mine = links.data.shard(g.len());
                *g = g[mine].to_vec();
            }
        }
        let mut total = [loss];
        links.data.all_reduce_sum(&mut total)?;
        Ok(total[0])
    }

    /// Finishes the gradients (tied parameters summed over the stages holding them, the loss
    /// and global norm over the pipeline, or over the whole mesh when stages have grids of
    /// their own), divides out the loss scale, clips, and updates what this device owns.
    /// Returns the norm before clipping, and whether the gradients overflowed under a loss
    /// scale (the update then skipped, on every device alike: they agree on the norm).
    pub(super) fn optimize(
        &self,
        device: &mut Device,
        links: &mut Links,
        grads: &mut Grads,
        loss: &mut f32,
    ) -> Result<(f64, bool), Failure> {
        let g = self.g;
        let tensor = &self.placement.grids[device.stage].tensor;
        // Replicated parameters read by split computation have partial gradients.
        if tensor.size > 1 {
            for &i in &tensor.partial_grads {
                if let Some(gr) = grads[i].as_mut() {
                    links.tensor.all_reduce_sum(gr)?;
                }
            }
        }
        if self.placement.pipeline > 1 {
            self.sum_over_stages(device, links, grads, loss)?;
        }
        self.check_finite(*loss)?;
        let scaled = self.loss_scale.is_some();
        if let Some(scale) = self.loss_scale {
            let unscale = 1.0 / scale;
            for gr in grads.iter_mut().flatten() {
                gr.iter_mut().for_each(|x| *x *= unscale);
            }
        }
        let norm = match (scaled, self.train.grad_clip) {
            (false, None) => None,
            _ => Some(self.global_norm(device, links, grads)?),
        };
        if scaled && norm.is_some_and(|n| !n.is_finite()) {
            return Ok((norm.unwrap_or_default(), true));
        }
        let grad_norm = match (self.train.grad_clip, norm) {
            (Some(max), Some(norm)) => {
                let factor = clip_factor(norm, max);
                if factor != 1.0 {
                    for gr in grads.iter_mut().flatten() {
                        gr.iter_mut().for_each(|x| *x *= factor);
                    }
                }
                norm
            }
            (None, Some(norm)) => norm,
            (_, None) => 0.0,
        };
        // The optimizer works on the weights in place (moved out and back, not copied): whole
        // parameters, or under ZeRO this device's shard of each.
        let zero = self.placement.zero;
        let mut flat: Vec<Vec<f32>> = (0..g.params.len())
            .map(|i| match (zero, grads[i].is_some()) {
                (_, false) => Vec::new(),
                (0, true) => std::mem::take(&mut device.values[i].data),
                (1 | 2, true) => {
                    let r = links.data.shard(device.values[i].data.len());
                    device.values[i].data[r].to_vec()
                }
                _ => device.shards[i].take().unwrap_or_default(),
            })
            .collect();
        step(
            &self.train.optimizer,
            self.lr,
            self.updates + 1,
            &mut flat,
            grads,
            &mut device.states,
        );
        for (i, updated) in flat.into_iter().enumerate() {
            match (zero, grads[i].is_some()) {
                (_, false) => {}
                (0, true) => device.values[i].data = updated,
                (1 | 2, true) => {
                    let r = links.data.shard(device.values[i].data.len());
                    device.values[i].data[r].copy_from_slice(&updated);
                }
                _ => device.shards[i] = Some(updated),
            }
        }
        Ok((grad_norm, false))
    }

    /// Parameters used by several stages (tied embeddings) get the sum of their gradients, and
    /// every device the step's loss (computed on one stage).
    fn sum_over_stages(
        &self,
        device: &Device,
        links: &mut Links,
        grads: &mut Grads,
        loss: &mut f32,
    ) -> Result<(), Failure> {
        let g = self.g;
        let holds = &self.placement.holds;
        let shared: Vec<usize> = (0..g.params.len())
            .filter(|&i| g.params[i].trainable && holds.iter().filter(|h| h[i]).count() > 1)
            .collect();
        let tensor = &self.placement.grids[device.stage].tensor;
        let zero = self.placement.zero >= 1;
        let Links { data, across, .. } = links;
        match across {
            // Devices pair up stage to stage: their shards of a shared parameter match, and
            // stages without it add zeros.
            Across::Pipeline(ring) => {
                let len = |i: usize| {
                    let n = tensor.local_len(g, i, device.part);
                    if zero {
                        data.shard(n).len()
                    } else {
                        n
                    }
                };
                let mut buf: Vec<f32> = Vec::new();
                for &i in &shared {
                    match &grads[i] {
                        Some(gr) => buf.extend_from_slice(gr),
                        None => buf.extend(std::iter::repeat_n(0.0, len(i))),
                    }
                }
                buf.push(*loss);
                ring.all_reduce_sum(&mut buf)?;
                *loss = buf.pop().unwrap_or_default();
                let mut at = 0;
                for &i in &shared {
                    let n = len(i);
                    if let Some(gr) = grads[i].as_mut() {
                        gr.copy_from_slice(&buf[at..at + n]);
                    }
                    at += n;
                }
            }
            // Stages on grids of their own shard differently: each device adds what it holds
            // alone in whole coordinates (its tensor shard, its ZeRO share within it; a
            // replicated gradient once per group, a replica's once per stage unless sharded),
            // and takes its own part of the sum.
            Across::World(ring) => {
                let whole_len = |i: usize| g.params[i].shape.iter().product::<u64>() as usize;
                let mut buf: Vec<f32> = Vec::new();
                for &i in &shared {
                    let layout = &tensor.params[i];
                    let adds =
                        (zero || device.rank == 0) && (layout.is_sharded() || device.part == 0);
                    match grads[i].as_ref().filter(|_| adds) {
                        Some(gr) => {
                            let shape = param_shape(&g.params[i]);
                            let local_shape = layout.local_shape(&shape, device.part, tensor.size);
                            let mut local = vec![0.0; local_shape.iter().product()];
                            let mine = if zero {
                                data.shard(local.len())
                            } else {
                                0..local.len()
                            };
                            local[mine].copy_from_slice(gr);
                            let local = HostTensor {
                                shape: local_shape,
                                data: local,
                            };
                            buf.extend(layout.place(&local, device.part, tensor.size).data);
                        }
                        None => buf.extend(std::iter::repeat_n(0.0, whole_len(i))),
                    }
                }
                let first =
                    (device.stage, device.rank, device.part) == (self.placement.loss_stage, 0, 0);
                buf.push(if first { *loss } else { 0.0 });
                ring.all_reduce_sum(&mut buf)?;
                *loss = buf.pop().unwrap_or_default();
                let mut at = 0;
                for &i in &shared {
                    let n = whole_len(i);
                    if let Some(gr) = grads[i].as_mut() {
                        let whole = HostTensor {
                            shape: param_shape(&g.params[i]),
                            data: buf[at..at + n].to_vec(),
                        };
                        let local = tensor.params[i]
                            .shard(&whole, device.part, tensor.size)
                            .data;
                        *gr = if zero {
                            local[data.shard(local.len())].to_vec()
                        } else {
                            local
                        };
                    }
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// The global gradient norm, each value counted once: a shared parameter on the first stage
    /// holding it, a replicated one on tensor rank 0, a ZeRO share on the device owning it.
    fn global_norm(
        &self,
        device: &Device,
        links: &mut Links,
        grads: &Grads,
    ) -> Result<f64, Failure> {
        let tensor = &self.placement.grids[device.stage].tensor;
        let mut sq: f64 = grads
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.placement.first_holder(i) == device.stage)
            .filter(|&(i, _)| tensor.params[i].is_sharded() || device.part == 0)
            .filter_map(|(_, gr)| gr.as_ref())
            .flat_map(|gr| gr.iter())
            .map(|&x| f64::from(x).powi(2))
            .sum();
        let zero = self.placement.zero >= 1;
        if let Across::World(_) = links.across {
            // Summed over every device at once: whole gradients once per stage.
            if !zero && device.rank != 0 {
                sq = 0.0;
            }
        }
        // Summed as an f32 pair (value and rounding error) to keep f64 precision.
        let high = sq as f32;
        let mut total = [high, (sq - f64::from(high)) as f32];
        match &mut links.across {
            Across::Pipeline(ring) => {
                if tensor.size > 1 {
                    links.tensor.all_reduce_sum(&mut total)?;
                }
                if zero {
                    links.data.all_reduce_sum(&mut total)?;
                }
                if self.placement.pipeline > 1 {
                    ring.all_reduce_sum(&mut total)?;
                }
            }
            Across::World(ring) => ring.all_reduce_sum(&mut total)?,
        }
        Ok((f64::from(total[0]) + f64::from(total[1])).sqrt())
    }
}

/// Sums every device's gradients (and losses) in place, bucket by bucket, last parameters first
/// (the order backward finishes them in, as DDP buckets them); returns the summed loss.
fn all_reduce_gradients(
    ring: &mut dyn Collective,
    grads: &mut [Option<Vec<f32>>],
    loss: f32,
) -> Result<f32, CollectiveError> {
    let order: Vec<usize> = (0..grads.len())
        .rev()
        .filter(|&i| grads[i].is_some())
        .collect();
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        bucket.extend_from_slice(grads[i].as_deref().unwrap_or_default());
        members.push(i);
        if bucket.len() < BUCKET_VALUES && k + 1 < order.len() {
            continue;
        }
        // The loss rides in the last bucket.
        let last = k + 1 == order.len();
        if last {
            bucket.push(loss);
        }
        ring.all_reduce_sum(&mut bucket)?;
        let mut at = 0;
        for m in members.drain(..) {
            if let Some(g) = grads[m].as_mut() {
                let n = g.len();
                g.copy_from_slice(&bucket[at..at + n]);
                at += n;
            }
        }
        if last {
            return Ok(bucket[at]);
        }
        bucket.clear();
    }
    let mut alone = [loss];
    ring.all_reduce_sum(&mut alone)?;
    Ok(alone[0])
}
