//! A checkpoint's tensors as the devices of a mesh hold them. Each device writes the pieces it
//! holds (its tensor-parallel part of a parameter, or under ZeRO its block of that part) into
//! files of its own, each piece saying where it lies in the whole tensor. A reader puts whole
//! tensors back together whatever mesh wrote them, so a run resumed on another mesh or number
//! of processes deals them out anew, as PyTorch DCP and Megatron's dist-ckpt reshard.
//!
//! Files: `weights-<device>-of-<devices>.safetensors` (trainable parameters, and the frozen ones
//! a checkpoint must hold itself) and `optimizer-<device>-of-<devices>.safetensors` (Adam's
//! moments, keyed `<param>.exp_avg` and `<param>.exp_avg_sq`), each piece's place in the file's
//! metadata under `kiln.pieces`. A device with nothing of its own to save writes no file: what
//! several devices hold alike (data-parallel replicas, tied parameters on several stages, a
//! parameter tensor parallelism replicates) is written once. Checkpoints of format 1 held whole
//! tensors in `trainable.safetensors`, `frozen.safetensors` and `optimizer.safetensors`; they
//! read as pieces that are the whole.

use crate::comm::block_shard;
use crate::parallel::tensor_parallel::Shards;
use crate::store::run_dir::{Checkpoint, StoreError};
use crate::store::safetensors::{parse_safetensors, safetensors_bytes, safetensors_metadata};
use crate::tensor::HostTensor;
use kiln_compiler::plan::sharding::ParamLayout;
use std::collections::BTreeMap;

/// Where a piece lies in its whole tensor: part `part` of `parts` as tensor parallelism cuts it
/// (`split`; none: the whole), then block `block` of `blocks` of that part, flattened, as ZeRO
/// shares it (`comm::block_shard`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Place {
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    pub part: usize,
    pub parts: usize,
    pub block: usize,
    pub blocks: usize,
}

/// Tensor parallelism's cut: along `axis`, each section's `1/parts` share
/// (`kiln_compiler::plan::sharding::section_ranges`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub axis: usize,
    pub sections: Vec<usize>,
}

impl Place {
    /// The piece that is all of a tensor of `shape`.
    pub fn whole(shape: &[usize]) -> Self {
        Place {
            shape: shape.to_vec(),
            split: None,
            part: 0,
            parts: 1,
            block: 0,
            blocks: 1,
        }
    }

    fn layout(&self) -> ParamLayout {
        match &self.split {
            Some(Split { axis, sections }) => ParamLayout::Shard {
                axis: *axis,
                sections: sections.clone(),
            },
            None => ParamLayout::Replicate,
        }
    }

    /// The shape of the tensor-parallel part this piece is a block of.
    fn part_shape(&self) -> Vec<usize> {
        self.layout()
            .local_shape(&self.shape, self.part, self.parts)
    }

    /// The same tensor cut the same way: what every piece of one tensor must agree on.
    fn same_cut(&self, other: &Place) -> bool {
        (&self.shape, &self.split, self.parts, self.blocks)
            == (&other.shape, &other.split, other.parts, other.blocks)
    }
}

/// One device's piece of a tensor, ready to be written.
pub struct Piece<'a> {
    pub key: String,
    pub place: Place,
    pub data: &'a [f32],
}

/// The two kinds of file a device writes (`as usize`: its place in [`Kind::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Weights = 0,
    Optimizer = 1,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Weights, Kind::Optimizer];

    /// The file of this kind that device `device` of `devices` writes.
    pub fn file_name(self, device: usize, devices: usize) -> String {
        let stem = match self {
            Kind::Weights => "weights",
            Kind::Optimizer => "optimizer",
        };
        format!("{stem}-{device:05}-of-{devices:05}.safetensors")
    }

    /// Whether a checkpoint's file `name` holds tensors of this kind (in either format).
    fn holds(self, name: &str) -> bool {
        let (stem, format_1): (&str, &[&str]) = match self {
            Kind::Weights => ("weights-", &["trainable.safetensors", "frozen.safetensors"]),
            Kind::Optimizer => ("optimizer-", &["optimizer.safetensors"]),
        };
        format_1.contains(&name) || (name.starts_with(stem) && name.ends_with(".safetensors"))
    }
}

/// The metadata key holding each piece's place.
const PIECES: &str = "kiln.pieces";

/// `pieces` as one safetensors file: a piece of a whole part keeps the part's shape, a ZeRO
/// block is flat.
pub fn file_bytes(pieces: &[Piece]) -> Result<Vec<u8>, String> {
    let places: BTreeMap<&str, &Place> =
        pieces.iter().map(|p| (p.key.as_str(), &p.place)).collect();
    let places =
        serde_json::to_string(&places).map_err(|e| format!("cannot describe the pieces: {e}"))?;
    let tensors = pieces
        .iter()
        .map(|p| {
            let shape = match p.place.blocks {
                1 => p.place.part_shape(),
                _ => vec![p.data.len()],
            };
            (p.key.clone(), shape, p.data)
        })
        .collect();
    safetensors_bytes(tensors, &[(PIECES, places.as_str())])
}

/// The whole weights a checkpoint holds (trainable, and the frozen ones it must hold itself).
pub fn saved_weights(checkpoint: &Checkpoint) -> Result<BTreeMap<String, HostTensor>, StoreError> {
    assemble(checkpoint, Kind::Weights)
}

/// The whole optimizer moments a checkpoint holds, keyed `<param>.exp_avg` / `.exp_avg_sq`.
pub fn saved_moments(checkpoint: &Checkpoint) -> Result<BTreeMap<String, HostTensor>, StoreError> {
    assemble(checkpoint, Kind::Optimizer)
}

/// Every tensor of `kind` in the checkpoint, put back together from its pieces; a piece missing,
/// held twice or out of place is an error naming the tensor.
fn assemble(
    checkpoint: &Checkpoint,
    kind: Kind,
) -> Result<BTreeMap<String, HostTensor>, StoreError> {
    let fail = |what: String| StoreError(format!("{}: {what}", checkpoint.dir.display()));
    let mut pieces: BTreeMap<String, Vec<(Place, Vec<f32>, String)>> = BTreeMap::new();
    for (name, bytes) in checkpoint.files().filter(|(name, _)| kind.holds(name)) {
        let path = checkpoint.dir.join(name);
        let tensors = parse_safetensors(bytes, &path).map_err(|e| StoreError(e.to_string()))?;
        let places: BTreeMap<String, Place> = match safetensors_metadata(bytes, &path)
            .map_err(|e| StoreError(e.to_string()))?
            .get(PIECES)
        {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                fail(format!(
                    "{name}'s description of its pieces is damaged: {e}"
                ))
            })?,
            // Format 1: whole tensors.
            None => tensors
                .iter()
                .map(|(key, t)| (key.clone(), Place::whole(&t.shape)))
                .collect(),
        };
        for (key, tensor) in tensors {
            let place = places.get(&key).cloned().ok_or_else(|| {
                fail(format!("{name} holds `{key}` without saying where it lies"))
            })?;
            pieces
                .entry(key)
                .or_default()
                .push((place, tensor.data, name.to_string()));
        }
    }
    pieces
        .into_iter()
        .map(|(key, pieces)| {
            let whole = put_together(pieces).map_err(|what| fail(format!("`{key}` {what}")))?;
            Ok((key, whole))
        })
        .collect()
}

/// One tensor from its pieces (place, values, file), each part's blocks laid end to end and the
/// parts put back as tensor parallelism cut them.
fn put_together(pieces: Vec<(Place, Vec<f32>, String)>) -> Result<HostTensor, String> {
    let first = pieces[0].0.clone();
    let (parts, blocks) = (first.parts, first.blocks);
    // Every (part, block) is held once: as many pieces as that, before anything is allocated.
    if parts == 0 || blocks == 0 || parts.checked_mul(blocks) != Some(pieces.len()) {
        return Err(format!(
            "is cut into {parts} parts of {blocks} blocks, and the checkpoint holds {} pieces of it",
            pieces.len()
        ));
    }
    if let Some(Split { axis, sections }) = &first.split {
        let total = sections.iter().try_fold(0usize, |n, &s| n.checked_add(s));
        if *axis >= first.shape.len() || total != Some(first.shape[*axis]) {
            return Err(format!(
                "is cut along axis {axis} into sections {sections:?}, which do not fit its shape {:?}",
                first.shape
            ));
        }
    }
    let numel = first
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("has an impossible shape {:?}", first.shape))?;
    let held: usize = pieces.iter().map(|(_, data, _)| data.len()).sum();
    if held != numel {
        return Err(format!(
            "has {held} values in its pieces for its {numel} (shape {:?}): a piece is missing or held twice",
            first.shape
        ));
    }
    // The parts' sizes must add up to the whole before any is allocated.
    let part_sizes: Vec<Option<usize>> = (0..parts)
        .map(|part| {
            let shape = Place {
                part,
                ..first.clone()
            }
            .part_shape();
            shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
        })
        .collect();
    let parts_total = part_sizes
        .iter()
        .try_fold(0usize, |n, size| n.checked_add((*size)?));
    if parts_total != Some(numel) {
        return Err(format!(
            "is cut into {parts} parts that do not make up its shape {:?}",
            first.shape
        ));
    }
    let mut filled: Vec<Vec<Option<String>>> = vec![vec![None; blocks]; parts];
    let mut part_values: Vec<HostTensor> = (0..parts)
        .map(|part| {
            let shape = Place {
                part,
                ..first.clone()
            }
            .part_shape();
            let data = vec![0.0; shape.iter().product()];
            HostTensor { shape, data }
        })
        .collect();
    for (place, data, file) in pieces {
        if !place.same_cut(&first) || place.part >= parts || place.block >= blocks {
            return Err(format!(
                "is cut one way in one file and another in {file}, or out of range there"
            ));
        }
        let part = &mut part_values[place.part];
        let range = block_shard(part.data.len(), blocks, place.block);
        if data.len() != range.len() {
            return Err(format!(
                "has {} values in {file} for part {} block {}, which holds {}",
                data.len(),
                place.part,
                place.block,
                range.len()
            ));
        }
        if let Some(other) = filled[place.part][place.block].replace(file.clone()) {
            return Err(format!(
                "has part {} block {} twice, in {other} and in {file}",
                place.part, place.block
            ));
        }
        part.data[range].copy_from_slice(&data);
    }
    let refs: Vec<&HostTensor> = part_values.iter().collect();
    let mut whole = first.layout().unshard(&refs);
    whole.shape = first.shape;
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor of `shape` cut into `parts` along `split` and `blocks` blocks of each part, as
    /// `(place, values)` pieces.
    fn cut(
        whole: &HostTensor,
        split: Option<Split>,
        parts: usize,
        blocks: usize,
    ) -> Vec<(Place, Vec<f32>)> {
        let mut pieces = Vec::new();
        for part in 0..parts {
            let place = Place {
                shape: whole.shape.clone(),
                split: split.clone(),
                part,
                parts,
                block: 0,
                blocks,
            };
            let local = place.layout().shard(whole, part, parts);
            for block in 0..blocks {
                let range = block_shard(local.data.len(), blocks, block);
                pieces.push((
                    Place {
                        block,
                        ..place.clone()
                    },
                    local.data[range].to_vec(),
                ));
            }
        }
        pieces
    }

    fn together(pieces: Vec<(Place, Vec<f32>)>) -> Result<HostTensor, String> {
        let named = pieces
            .into_iter()
            .enumerate()
            .map(|(i, (p, d))| (p, d, format!("file {i}")))
            .collect();
        put_together(named)
    }

    fn whole() -> HostTensor {
        HostTensor {
            shape: vec![3, 6],
            data: (0..18).map(|x| x as f32).collect(),
        }
    }

    #[test]
    fn any_cut_puts_back_the_same_tensor() {
        // A fused [3, 6] weight with sections 2|4 along its columns.
        let fused = Some(Split {
            axis: 1,
            sections: vec![2, 4],
        });
        for (split, parts) in [(None, 1), (fused.clone(), 2), (fused, 1)] {
            for blocks in [1, 2, 4, 7] {
                let back = together(cut(&whole(), split.clone(), parts, blocks)).unwrap();
                assert_eq!(back, whole(), "{parts} parts, {blocks} blocks");
            }
        }
    }

    #[test]
    fn a_missing_doubled_or_misplaced_piece_is_named() {
        let rows = Some(Split {
            axis: 0,
            sections: vec![3],
        });
        let mut missing = cut(&whole(), rows.clone(), 3, 2);
        missing.remove(3);
        assert!(together(missing).unwrap_err().contains("holds 5 pieces"));
        // A cut claiming more pieces than any checkpoint could hold is refused before
        // anything is allocated for it.
        let mut huge = cut(&whole(), None, 1, 1);
        huge[0].0.parts = usize::MAX / 2;
        assert!(together(huge).unwrap_err().contains("parts"));
        let mut doubled = cut(&whole(), rows.clone(), 3, 2);
        doubled.remove(3);
        let again = doubled[0].clone();
        doubled.push(again);
        let err = together(doubled).unwrap_err();
        assert!(err.contains("part 0 block 0 twice"), "{err}");
        let mut other_cut = cut(&whole(), rows, 3, 2);
        other_cut[1].0.blocks = 3;
        assert!(together(other_cut).unwrap_err().contains("another"));
        let mut bad_split = cut(&whole(), None, 1, 1);
        bad_split[0].0.split = Some(Split {
            axis: 4,
            sections: vec![6],
        });
        assert!(together(bad_split).unwrap_err().contains("axis 4"));
    }
}
