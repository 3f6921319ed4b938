//! Which process of which job this is, as the launcher that started it says: Open MPI's
//! `mpirun` (`OMPI_COMM_WORLD_*`), MPICH's Hydra (`PMI_*`), Slurm's `srun` (`SLURM_*`) or
//! torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Nothing set:
//! one process on its own.

/// The launcher that started this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    OpenMpi,
    Hydra,
    Slurm,
    Torchrun,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::OpenMpi => "mpirun (Open MPI)",
            Launcher::Hydra => "mpiexec (MPICH)",
            Launcher::Slurm => "srun (Slurm)",
            Launcher::Torchrun => "torchrun",
        })
    }
}

/// This process's place in its job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// `None`: started on its own, a job of one process.
    pub launcher: Option<Launcher>,
    pub rank: usize,
    pub world: usize,
    /// Its rank among the job's processes on this machine (which GPU it takes).
    pub local_rank: usize,
    /// The job's processes on this machine, itself included (1 when the launcher does not
    /// say): they share its cores.
    pub local_size: usize,
    /// torchrun's rendezvous address, `MASTER_ADDR:MASTER_PORT`.
    pub master: Option<String>,
}

/// The variables each launcher sets: rank, world size, local rank, local size (Slurm's only
/// when the job asked for a number of tasks per node).
const LAUNCHERS: [(Launcher, [&str; 4]); 4] = [
    (
        Launcher::OpenMpi,
        [
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ],
    ),
    (
        Launcher::Hydra,
        ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
    ),
    (
        Launcher::Slurm,
        [
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
            "SLURM_NTASKS_PER_NODE",
        ],
    ),
    (
        Launcher::Torchrun,
        ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
    ),
];

impl Launch {
    /// A process started on its own.
    pub fn alone() -> Self {
        Launch {
            launcher: None,
            rank: 0,
            world: 1,
            local_rank: 0,
            local_size: 1,
            master: None,
        }
    }

    /// What this process's environment says.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// What the variables `var` looks up say: the first launcher (in the order above) whose
    /// rank and world size are both set. MPI's own variables come first because `mpirun`
    /// inside a Slurm allocation also inherits the allocation's `SLURM_*`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        for (launcher, [rank, world, local, local_world]) in LAUNCHERS {
            let (Some(r), Some(w)) = (var(rank), var(world)) else {
                continue;
            };
            let number = |name: &str, text: &str| {
                text.trim().parse::<usize>().map_err(|_| {
                    format!("{launcher} set {name}={text:?}, which is not a process number")
                })
            };
            let (rank_no, world_no) = (number(rank, &r)?, number(world, &w)?);
            if world_no == 0 || rank_no >= world_no {
                return Err(format!(
                    "{launcher} set {rank}={rank_no} and {world}={world_no}: a rank must be below the world size"
                ));
            }
            let local_rank = match var(local) {
                Some(l) => number(local, &l)?,
                None => 0,
            };
            let local_size = match var(local_world) {
                Some(l) => number(local_world, &l)?.max(1),
                None => 1,
            };
            let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
                (Some(addr), Some(port)) if launcher == Launcher::Torchrun => {
                    Some(format!("{addr}:{port}"))
                }
                _ => None,
            };
            return Ok(Launch {
                launcher: Some(launcher),
                rank: rank_no,
                world: world_no,
                local_rank,
                local_size,
                master,
            });
        }
        Ok(Launch::alone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch, String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn each_launcher_is_read_from_its_own_variables() {
        assert_eq!(launch(&[]).unwrap(), Launch::alone());
        let mpi = launch(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            // mpirun inside a Slurm allocation: MPI's own numbers win.
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap();
        assert_eq!(
            (
                mpi.launcher,
                mpi.rank,
                mpi.world,
                mpi.local_rank,
                mpi.local_size
            ),
            (Some(Launcher::OpenMpi), 3, 4, 1, 2)
        );
        let slurm = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(
            (slurm.launcher, slurm.rank, slurm.world, slurm.local_rank),
            (Some(Launcher::Slurm), 5, 8, 1)
        );
        assert_eq!(slurm.local_size, 1, "not said: alone on its machine");
        let torch = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(torch.launcher, Some(Launcher::Torchrun));
        assert_eq!(torch.master.as_deref(), Some("10.0.0.1:29500"));
        let hydra = launch(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]).unwrap();
        assert_eq!((hydra.launcher, hydra.world), (Some(Launcher::Hydra), 2));
    }

    #[test]
    fn numbers_that_do_not_make_a_job_are_refused_by_name() {
        let err = launch(&[("RANK", "two"), ("WORLD_SIZE", "4")]).unwrap_err();
        assert!(err.contains("RANK=\"two\""), "{err}");
        let err = launch(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")]).unwrap_err();
        assert!(err.contains("below the world size"), "{err}");
    }
}
