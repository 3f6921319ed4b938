//! Tensor parallelism's data movement in the executor's terms: cutting whole tensors into a
//! rank's shards by the layout the compiler decided (`kiln_compiler::plan::sharding`) and
//! putting them back, and the vocabulary-parallel loss's view of its group.

use crate::comm::Collective;
use crate::tensor::HostTensor;
use kiln_compiler::plan::sharding::{section_ranges, ParamLayout, VocabColumns};

/// A rank's columns of the vocabulary and the group holding the rest: Megatron's
/// vocabulary-parallel cross-entropy, which never gathers the `[b, s, vocab]` logits (a
/// language model's largest activation) onto one rank.
pub struct VocabShard<'a> {
    pub at: &'a VocabColumns,
    pub group: &'a mut dyn Collective,
}

/// Rows × columns of a tensor seen as 2-D with `axis` as columns' or rows' side: (outer,
/// axis length, inner).
fn dims(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Whole parameters cut into shards and put back, as a `ParamLayout` lays them out.
pub trait Shards {
    fn shard(&self, whole: &HostTensor, rank: usize, size: usize) -> HostTensor;
    fn unshard(&self, shards: &[&HostTensor]) -> HostTensor;
    fn place(&self, shard: &HostTensor, rank: usize, size: usize) -> HostTensor;
}

impl Shards for ParamLayout {
    /// Rank `rank`'s shard of a whole parameter.
    fn shard(&self, whole: &HostTensor, rank: usize, size: usize) -> HostTensor {
        let ParamLayout::Shard { axis, sections } = self else {
            return whole.clone();
        };
        let axis = (*axis).min(whole.shape.len().saturating_sub(1));
        let (outer, _, inner) = dims(&whole.shape, axis);
        let ranges = section_ranges(sections, rank, size);
        let mut shape = whole.shape.clone();
        shape[axis] = ranges.iter().map(|r| r.len()).sum();
        let mut data = Vec::with_capacity(outer * shape[axis] * inner);
        let len = whole.shape[axis];
        for o in 0..outer {
            for r in &ranges {
                let from = (o * len + r.start) * inner;
                data.extend_from_slice(&whole.data[from..from + r.len() * inner]);
            }
        }
        HostTensor { shape, data }
    }

    /// The whole parameter from every rank's shard, in rank order.
    fn unshard(&self, shards: &[&HostTensor]) -> HostTensor {
        if !self.is_sharded() {
            return shards[0].clone();
        }
        let size = shards.len();
        let mut whole = self.place(shards[0], 0, size);
        for (rank, shard) in shards.iter().enumerate().skip(1) {
            let placed = self.place(shard, rank, size);
            whole
                .data
                .iter_mut()
                .zip(placed.data)
                .for_each(|(w, p)| *w += p);
        }
        whole
    }

    /// A whole-sized tensor holding rank `rank`'s shard where it belongs, zeros elsewhere (the
    /// ranks' placements sum to the whole).
    fn place(&self, shard: &HostTensor, rank: usize, size: usize) -> HostTensor {
        let ParamLayout::Shard { axis, sections } = self else {
            return shard.clone();
        };
        let axis = (*axis).min(shard.shape.len().saturating_sub(1));
        let mut shape = shard.shape.clone();
        shape[axis] = sections.iter().sum();
        let (outer, len, inner) = dims(&shape, axis);
        let mut data = vec![0.0; outer * len * inner];
        let ranges = section_ranges(sections, rank, size);
        let local_len = shard.shape[axis];
        for o in 0..outer {
            let mut local_at = 0;
            for r in &ranges {
                let to = (o * len + r.start) * inner;
                let from = (o * local_len + local_at) * inner;
                data[to..to + r.len() * inner]
                    .copy_from_slice(&shard.data[from..from + r.len() * inner]);
                local_at += r.len();
            }
        }
        HostTensor { shape, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_by_section_and_back() {
        // A fused [2, 6] weight with sections 2|4 along its columns, over 2 ranks.
        let whole = HostTensor {
            shape: vec![2, 6],
            data: (0..12).map(|x| x as f32).collect(),
        };
        let layout = ParamLayout::Shard {
            axis: 1,
            sections: vec![2, 4],
        };
        let a = layout.shard(&whole, 0, 2);
        let b = layout.shard(&whole, 1, 2);
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 2.0, 3.0, 6.0, 8.0, 9.0]);
        assert_eq!(b.data, vec![1.0, 4.0, 5.0, 7.0, 10.0, 11.0]);
        assert_eq!(layout.unshard(&[&a, &b]), whole);
        let rows = ParamLayout::Shard {
            axis: 0,
            sections: vec![2],
        };
        assert_eq!(
            rows.shard(&whole, 1, 2).data,
            (6..12).map(|x| x as f32).collect::<Vec<_>>()
        );
    }
}
