//! The plan's placement executed on a mesh of device threads: which nodes each pipeline stage
//! runs (`placement`), the devices and one training step over them (`mesh`, its stage
//! boundaries in `mesh/boundary`), tensor-parallel shards (`tensor_parallel`) and the
//! collectives and mailboxes they talk over (`collective`).

pub mod collective;
pub mod mesh;
pub mod placement;
pub mod tensor_parallel;
