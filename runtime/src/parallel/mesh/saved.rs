//! What each device of the mesh saves of a checkpoint: the pieces of parameters and optimizer
//! moments it holds, each written by one device only (`store::sharded`). A parameter is saved
//! from the first stage holding it; on that stage, by every tensor-parallel rank when the
//! parameter is split (by rank 0 when replicated), and by every data-parallel rank when ZeRO
//! shares it among them (by rank 0 when each replica holds it all).

use super::{Device, Mesh};
use crate::store::sharded::{Kind, Piece, Place, Split};
use crate::tensor::param_shape;
use kiln_compiler::graph::Graph;
use kiln_compiler::plan::sharding::ParamLayout;

/// One hosted device's pieces of a checkpoint, by kind of file.
pub struct DevicePieces<'a> {
    /// Its place in the mesh.
    pub device: usize,
    pub files: Vec<(Kind, Vec<Piece<'a>>)>,
}

impl Mesh {
    /// The devices of the mesh, over every process of the job.
    pub fn devices(&self) -> usize {
        self.placement.grids.iter().map(|grid| grid.devices()).sum()
    }

    /// What each device this process hosts saves: the weights of the parameters `saved` marks,
    /// and the moments of the trainable ones the optimizer has updated.
    pub fn pieces<'a>(&'a self, g: &Graph, saved: &[bool]) -> Vec<DevicePieces<'a>> {
        self.devices
            .iter()
            .map(|d| DevicePieces {
                device: d.index,
                files: vec![
                    (Kind::Weights, self.weight_pieces(g, d, saved)),
                    (Kind::Optimizer, self.moment_pieces(g, d)),
                ],
            })
            .collect()
    }

    fn weight_pieces<'a>(&self, g: &Graph, d: &'a Device, saved: &[bool]) -> Vec<Piece<'a>> {
        let zero3 = self.placement.zero >= 3;
        (0..g.params.len())
            .filter(|&i| saved[i])
            .filter_map(|i| {
                let data = match zero3 {
                    true => d.shards[i].as_deref()?,
                    false => d.values[i].data.as_slice(),
                };
                let place = self.place_of(g, d, i, zero3)?;
                Some(Piece {
                    key: g.params[i].name.clone(),
                    place,
                    data,
                })
            })
            .collect()
    }

    /// Moments exist on every device sharing a parameter or on none: the optimizer makes them
    /// at a parameter's first update, which every device holding it takes in the same step.
    fn moment_pieces<'a>(&self, g: &Graph, d: &'a Device) -> Vec<Piece<'a>> {
        let shared = self.placement.zero >= 1;
        let mut pieces = Vec::new();
        for (i, state) in d.states.iter().enumerate() {
            let (Some(state), Some(place)) = (state, self.place_of(g, d, i, shared)) else {
                continue;
            };
            let name = &g.params[i].name;
            for (suffix, data) in [("exp_avg", &state.m), ("exp_avg_sq", &state.v)] {
                pieces.push(Piece {
                    key: format!("{name}.{suffix}"),
                    place: place.clone(),
                    data,
                });
            }
        }
        pieces
    }

    /// Where device `d`'s copy of parameter `i` (or of something shaped like it) lies in the
    /// whole, when `d` is the one device to save it: `shared`, its block among the data-parallel
    /// ranks (ZeRO), else the copy of data rank 0.
    fn place_of(&self, g: &Graph, d: &Device, i: usize, shared: bool) -> Option<Place> {
        if d.stage != self.placement.first_holder(i) || !self.placement.holds[d.stage][i] {
            return None;
        }
        let grid = &self.placement.grids[d.stage];
        let (split, part, parts) = match &grid.tensor.params[i] {
            ParamLayout::Shard { axis, sections } => (
                Some(Split {
                    axis: *axis,
                    sections: sections.clone(),
                }),
                d.part,
                grid.tensor.size,
            ),
            ParamLayout::Replicate if d.part == 0 => (None, 0, 1),
            ParamLayout::Replicate => return None,
        };
        let (block, blocks) = match shared {
            true => (d.rank, grid.data),
            false if d.rank == 0 => (0, 1),
            false => return None,
        };
        Some(Place {
            shape: param_shape(&g.params[i]),
            split,
            part,
            parts,
            block,
            blocks,
        })
    }
}
