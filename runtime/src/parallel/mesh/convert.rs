//! Values moving between pieces that compute differently under tensor parallelism (see
//! `Conversion`): gathered, reduced, scattered or sliced over the tensor-parallel group, and
//! their gradients back in their producer's form.

use super::{own, Failure};
use crate::comm::{Collective, CollectiveError};
use crate::exec::Value;
use crate::parallel::tensor_parallel::Shards;
use crate::tensor::HostTensor;
use kiln_compiler::plan::sharding::{last_axis, sequence_axis, Conversion, ParamLayout};

/// A value on its way into a piece that computes differently from its producer (see
/// [`Conversion`]): gathered, reduced, scattered or sliced over the tensor-parallel group.
pub(super) fn convert_forward(
    ring: &mut dyn Collective,
    conversion: &Conversion,
    value: &Value,
) -> Result<Value, Failure> {
    if matches!(conversion, Conversion::None | Conversion::ReduceGradient) {
        return Ok(value.clone());
    }
    let (rank, size) = (ring.rank(), ring.size());
    let host = value.to_host().map_err(own)?;
    let converted = match conversion {
        Conversion::AllGather(sections) => gathered(ring, last_axis(&host.shape, sections), &host)?,
        Conversion::GatherSequence { .. } => gathered(ring, sequence_of(&host, size), &host)?,
        Conversion::ScatterSequence => {
            let whole = summed(ring, host)?;
            sequence_axis(&whole.shape).shard(&whole, rank, size)
        }
        Conversion::SliceSequence => sequence_axis(&host.shape).shard(&host, rank, size),
        Conversion::ShardLast(sections) => {
            last_axis(&host.shape, sections).shard(&host, rank, size)
        }
        _ => summed(ring, host)?,
    };
    Value::from_host(converted).map_err(own)
}

/// The gradient of a converted value, back in its producer's form.
pub(super) fn convert_backward(
    ring: &mut dyn Collective,
    conversion: &Conversion,
    grad: Value,
) -> Result<Value, Failure> {
    if matches!(conversion, Conversion::None | Conversion::AllReduce) {
        return Ok(grad);
    }
    let (rank, size) = (ring.rank(), ring.size());
    let host = grad.to_host().map_err(own)?;
    let converted = match conversion {
        Conversion::AllGather(sections) => {
            last_axis(&host.shape, sections).shard(&host, rank, size)
        }
        Conversion::GatherSequence { partial_gradients } => {
            let host = if *partial_gradients {
                summed(ring, host)?
            } else {
                host
            };
            sequence_axis(&host.shape).shard(&host, rank, size)
        }
        Conversion::ScatterSequence | Conversion::SliceSequence => {
            gathered(ring, sequence_of(&host, size), &host)?
        }
        Conversion::ShardLast(sections) => gathered(ring, last_axis(&host.shape, sections), &host)?,
        _ => summed(ring, host)?,
    };
    Value::from_host(converted).map_err(own)
}

pub(super) fn summed(
    ring: &mut dyn Collective,
    mut t: HostTensor,
) -> Result<HostTensor, CollectiveError> {
    ring.all_reduce_sum(&mut t.data)?;
    Ok(t)
}

/// Every rank's part of a value laid out by `layout`, whole on every rank: each rank places
/// its part in a whole-sized buffer and the buffers are summed (parts of a vocabulary that does
/// not divide evenly differ in size).
pub(super) fn gathered(
    ring: &mut dyn Collective,
    layout: ParamLayout,
    part: &HostTensor,
) -> Result<HostTensor, CollectiveError> {
    let whole = layout.place(part, ring.rank(), ring.size());
    summed(ring, whole)
}

/// The sequence layout of a value of which `part` is one rank's share.
pub(super) fn sequence_of(part: &HostTensor, size: usize) -> ParamLayout {
    let mut shape = part.shape.clone();
    if let Some(s) = shape.get_mut(1) {
        *s *= size;
    }
    sequence_axis(&shape)
}
