//! The plan's placement executed on a mesh of devices: which nodes each pipeline stage runs
//! (`placement`), the devices and one training step over them (`mesh`, its stage boundaries in
//! `mesh/boundary`) and tensor-parallel shards (`tensor_parallel`). The devices talk through
//! `crate::comm`.

pub mod mesh;
pub mod placement;
pub mod tensor_parallel;
