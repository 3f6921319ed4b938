//! The processes of a job: this process alone (every device of the mesh one of its threads), or
//! one process per device in an MPI job. Only rank 0 speaks (progress, metrics, plots); every
//! rank computes.

use super::launch::Launch;

pub enum World {
    /// This process alone: every device of the mesh is one of its threads.
    Alone,
    /// One process per device, this one hosting device `rank`.
    #[cfg(feature = "mpi")]
    Mpi(super::mpi::MpiWorld),
}

impl World {
    /// Joins the job the launcher started: alone when it started one process, else over MPI.
    /// A process that shares its machine with others of the job takes its share of the cores
    /// for its kernels (unless `RAYON_NUM_THREADS` says how many), rather than each of them
    /// running a thread per core.
    pub fn join(launch: &Launch) -> Result<World, String> {
        if launch.world == 1 {
            return Ok(World::Alone);
        }
        if launch.local_size > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Only the first pool of the process can be configured; one built before keeps
            // its threads.
            rayon::ThreadPoolBuilder::new()
                .num_threads((cores / launch.local_size).max(1))
                .build_global()
                .ok();
        }
        #[cfg(feature = "mpi")]
        {
            super::mpi::MpiWorld::init(launch).map(World::Mpi)
        }
        #[cfg(not(feature = "mpi"))]
        {
            let launcher = launch
                .launcher
                .map_or("the launcher".into(), |l| l.to_string());
            Err(format!(
                "{launcher} started {} processes and this kiln was built without MPI: build it with `cargo build --release --features mpi` (Debian: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`)",
                launch.world
            ))
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            World::Alone => 0,
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.rank(),
        }
    }

    pub fn size(&self) -> usize {
        match self {
            World::Alone => 1,
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.size(),
        }
    }

    /// Whether this process reports for the job: prints, writes metrics and plots.
    pub fn speaks(&self) -> bool {
        self.rank() == 0
    }

    /// Ends the job after this process failed (its message already printed): in an MPI job
    /// every other process is stopped too, rather than left waiting for this one.
    pub fn abort(&self, code: i32) -> ! {
        match self {
            World::Alone => std::process::exit(code),
            #[cfg(feature = "mpi")]
            World::Mpi(mpi) => mpi.abort(code),
        }
    }
}
