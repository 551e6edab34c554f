//! Joining a distributed run: a process started by `mpirun` (or `srun`) finds itself in an
//! MPI job by the launcher's environment and becomes one rank of a data-parallel group; a
//! plain process trains alone. On a failure a rank reports and aborts the whole job, so no
//! other rank waits for it.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Result;
use kiln_dist::Collectives;
use kiln_train::{DataParallel, DistConfig};

thread_local! {
    /// The engine of this process's group, for [`abort_job`].
    static ACTIVE: RefCell<Option<Rc<dyn Collectives>>> = const { RefCell::new(None) };
}

/// Whether a launcher started this process as one rank of several (OpenMPI, MPICH/PMI, Slurm's
/// PMIx).
pub fn launched_as_rank() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MV2_COMM_WORLD_SIZE",
    ]
    .iter()
    .filter_map(std::env::var_os)
    .any(|v| v != "1" || std::env::var_os("PMIX_RANK").is_some())
}

/// The data-parallel group of this process, or `None` when it runs alone.
pub fn join(cfg: &DistConfig) -> Result<Option<DataParallel>> {
    if !launched_as_rank() {
        return Ok(None);
    }
    let comm = engine(cfg)?;
    if comm.world_size() == 1 {
        return Ok(None);
    }
    tracing::info!(
        "rank {} of {} ({}, strategy {:?}, timeout {} s)",
        comm.rank(),
        comm.world_size(),
        comm.engine(),
        cfg.strategy,
        cfg.timeout_s
    );
    ACTIVE.with(|a| *a.borrow_mut() = Some(comm.clone()));
    Ok(Some(DataParallel::new(comm, cfg.clone())))
}

#[cfg(feature = "mpi")]
fn engine(cfg: &DistConfig) -> Result<Rc<dyn Collectives>> {
    let timeout = std::time::Duration::from_secs_f64(cfg.timeout_s);
    let mpi = kiln_dist::MpiCollectives::init(timeout)?;
    #[cfg(feature = "cuda")]
    if let d @ candle_core::Device::Cuda(_) = crate::commands::device() {
        // GPU ranks: NCCL between the devices, MPI for the rest.
        return Ok(Rc::new(kiln_dist::NcclCollectives::init(mpi, d)?));
    }
    Ok(Rc::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn engine(_cfg: &DistConfig) -> Result<Rc<dyn Collectives>> {
    anyhow::bail!(
        "started by an MPI launcher, but this kiln was built without MPI \
         (scripts/install-mpi.sh, then cargo build --release with the default features)"
    )
}

/// The `[dist]` section of a run config file with `--set` overrides applied (defaults when
/// absent), read before the trainer so that the group is joined with its timeout.
pub fn config_of(file: Option<&std::path::Path>, overrides: &[String]) -> Result<DistConfig> {
    let mut root: toml::Table = match file {
        Some(p) => std::fs::read_to_string(p)?
            .parse()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", p.display(), e.message()))?,
        None => toml::Table::new(),
    };
    for o in overrides.iter().filter(|o| o.starts_with("dist.")) {
        kiln_train::apply_override(&mut root, o)?;
    }
    let section = root
        .remove("dist")
        .unwrap_or_else(|| toml::Value::Table(Default::default()));
    let cfg: DistConfig = section
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("[dist] {}", e.message()))?;
    cfg.validate()?;
    Ok(cfg)
}

/// The observer of ranks other than 0: nothing to show.
pub struct Quiet;
impl kiln_train::Observer for Quiet {}
impl kiln_sft::SftObserver for Quiet {}

/// This process's rank in a distributed run (0 alone).
pub fn rank() -> usize {
    ACTIVE.with(|a| a.borrow().as_ref().map_or(0, |c| c.rank()))
}

/// Leaves the group after a successful run (MPI is finalised when the engine is dropped).
pub fn leave() {
    ACTIVE.with(|a| a.borrow_mut().take());
}

/// After an error on this rank: ends every rank of the job (no-op when running alone).
pub fn abort_job(code: i32) {
    let comm = ACTIVE.with(|a| a.borrow_mut().take());
    if let Some(c) = comm {
        c.abort(code);
    }
}
