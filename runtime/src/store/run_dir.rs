//! A run's directory, `<runs>/<experiment>/`, and what keeps it whole: one process at a time
//! (`run.lock`, holding the owner's pid), a metrics log written a line at a time and cut back to
//! the checkpoint a run resumes from, and checkpoints that are complete or absent.
//!
//! A checkpoint is a directory `checkpoints/step-<N>/` holding its files and `manifest.json`
//! (the step, each file's size and SHA-256). It is written as `checkpoints/.partial-step-<N>/`
//! (by every process of a job, each its own files, and the owner of the run directory its own
//! and the manifest of all of them), each file and the directory flushed to disk, then renamed
//! into place in one step: readers only look at `step-*` directories and check the manifest
//! before using one. The previous
//! checkpoints stay until the new one is in place; then all but the newest `keep` are removed.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A run directory that cannot be used as asked, with what to do about it.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

fn io_error(path: &Path, err: std::io::Error) -> StoreError {
    StoreError(format!("{}: {err}", path.display()))
}

const LOCK_FILE: &str = "run.lock";
const METRICS_FILE: &str = "metrics.jsonl";
const CHECKPOINTS: &str = "checkpoints";
const MANIFEST: &str = "manifest.json";
const PARTIAL_PREFIX: &str = ".partial-";
/// Where Kiln before manifests kept its one checkpoint.
const LEGACY_CHECKPOINT: &str = "checkpoint";
/// Bumped when the layout of a checkpoint changes in a way older readers cannot follow: 2 holds
/// each device's pieces of the tensors (`store::sharded`), 1 whole tensors.
const FORMAT: u64 = 2;
/// The formats this Kiln reads.
const READS: std::ops::RangeInclusive<u64> = 1..=FORMAT;

/// A run directory this process owns until it is dropped (the lock is the kernel's `flock`,
/// released even when the process is killed).
pub struct RunDir {
    root: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates (if needed) and takes `<runs>/<name>`; another live `kiln run` of the same
    /// experiment into the same directory is an error naming its pid.
    pub fn lock(runs: &Path, name: &str) -> Result<Self, StoreError> {
        let root = runs.join(name);
        std::fs::create_dir_all(&root).map_err(|err| io_error(&root, err))?;
        let path = root.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|err| io_error(&path, err))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                lock.read_to_string(&mut holder).ok();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    String::from("another process")
                } else {
                    format!("another process (pid {holder})")
                };
                return Err(StoreError(format!(
                    "{} is in use by {who}: two runs of `{name}` into one directory would overwrite each other's checkpoints and metrics; wait for it to finish, stop it, or pass another --runs directory",
                    root.display()
                )));
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(io_error(&path, err)),
        }
        lock.set_len(0).map_err(|err| io_error(&path, err))?;
        writeln!(lock, "{}", std::process::id()).map_err(|err| io_error(&path, err))?;
        let dir = RunDir { root, _lock: lock };
        dir.remove_partial_checkpoints()?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINTS)
    }

    /// The step of the newest checkpoint, without reading it; `None` when there is none.
    pub fn newest_step(&self) -> Result<Option<u64>, StoreError> {
        self.refuse_legacy()?;
        Ok(complete_steps(&self.checkpoints())?
            .last()
            .map(|(step, _)| *step))
    }

    /// The newest checkpoint, verified against its manifest; `None` when there is none.
    pub fn latest(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.refuse_legacy()?;
        latest_checkpoint(&self.root)
    }

    fn refuse_legacy(&self) -> Result<(), StoreError> {
        let legacy = self.root.join(LEGACY_CHECKPOINT);
        if legacy.exists() {
            return Err(StoreError(format!(
                "{} holds a checkpoint in the layout of an older Kiln, without a manifest to verify it: move it away to keep it, or start over with --restart (which removes it)",
                legacy.display()
            )));
        }
        Ok(())
    }

    /// Forgets the run: its checkpoints and metrics (for a run started over).
    pub fn clear(&self) -> Result<(), StoreError> {
        for dir in [self.checkpoints(), self.root.join(LEGACY_CHECKPOINT)] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|err| io_error(&dir, err))?;
            }
        }
        let metrics = self.root.join(METRICS_FILE);
        if metrics.exists() {
            std::fs::remove_file(&metrics).map_err(|err| io_error(&metrics, err))?;
        }
        Ok(())
    }

    /// Writes a checkpoint of `step` from `files` (name, bytes) alone, as one process, and
    /// keeps the newest `keep`.
    pub fn save(
        &self,
        step: u64,
        files: &[(&str, &[u8])],
        keep: usize,
    ) -> Result<PathBuf, StoreError> {
        match self.begin(step)? {
            Some(_) => self.commit(step, BTreeMap::new(), files, keep),
            None => Ok(self.checkpoints().join(step_dir_name(step))),
        }
    }

    /// Opens the checkpoint of `step` for writing: the directory every process of the job writes
    /// its files into ([`write_checkpoint_file`]) before [`RunDir::commit`] puts it in place.
    /// `None` when that checkpoint is in place already (a run resumed from it saves nothing).
    pub fn begin(&self, step: u64) -> Result<Option<PathBuf>, StoreError> {
        let checkpoints = self.checkpoints();
        std::fs::create_dir_all(&checkpoints).map_err(|err| io_error(&checkpoints, err))?;
        if checkpoints.join(step_dir_name(step)).exists() {
            return Ok(None);
        }
        let partial = partial_checkpoint(&self.root, step);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|err| io_error(&partial, err))?;
        }
        std::fs::create_dir(&partial).map_err(|err| io_error(&partial, err))?;
        Ok(Some(partial))
    }

    /// Completes the checkpoint of `step` that [`RunDir::begin`] opened: writes this process's
    /// `own` files, then the manifest of those and of the `written` ones (what every process
    /// reported writing), and renames the directory into place; then keeps the newest `keep`.
    /// On failure nothing of it is left behind and the earlier checkpoints are untouched.
    pub fn commit(
        &self,
        step: u64,
        written: BTreeMap<String, FileDigest>,
        own: &[(&str, &[u8])],
        keep: usize,
    ) -> Result<PathBuf, StoreError> {
        let checkpoints = self.checkpoints();
        let partial = partial_checkpoint(&self.root, step);
        let done = checkpoints.join(step_dir_name(step));
        let completed = (|| {
            let mut files = written;
            for (name, bytes) in own {
                files.insert(
                    name.to_string(),
                    write_checkpoint_file(&partial, name, bytes)?,
                );
            }
            for name in files.keys() {
                if !partial.join(name).is_file() {
                    return Err(StoreError(format!(
                        "{} was reported written but is not there: do all processes of the job see the same run directory?",
                        partial.join(name).display()
                    )));
                }
            }
            let manifest = Manifest {
                format: FORMAT,
                step,
                files: files.into_iter().map(|(n, d)| (n, d.into())).collect(),
            };
            let text = serde_json::to_vec_pretty(&manifest)
                .map_err(|err| StoreError(format!("cannot write the manifest: {err}")))?;
            write_synced(&partial.join(MANIFEST), &text)?;
            sync_dir(&partial)?;
            std::fs::rename(&partial, &done).map_err(|err| io_error(&done, err))?;
            sync_dir(&checkpoints)
        })();
        if let Err(err) = completed {
            self.abandon(step);
            return Err(StoreError(format!(
                "cannot save the checkpoint of step {step}: {err}; the previous checkpoint is intact"
            )));
        }
        self.prune(keep.max(1));
        Ok(done)
    }

    /// Removes what was written of the checkpoint of `step` that could not be completed.
    pub fn abandon(&self, step: u64) {
        std::fs::remove_dir_all(partial_checkpoint(&self.root, step)).ok();
    }

    /// Removes all but the newest `keep` checkpoints, as far as it can: one left behind costs
    /// disk space, never correctness, so it does not fail the save that came before.
    fn prune(&self, keep: usize) {
        let Ok(steps) = complete_steps(&self.checkpoints()) else {
            return;
        };
        for (_, dir) in steps.iter().rev().skip(keep) {
            std::fs::remove_dir_all(dir).ok();
        }
    }

    /// What a killed save left behind: never read, so safe to remove under the lock.
    fn remove_partial_checkpoints(&self) -> Result<(), StoreError> {
        let checkpoints = self.checkpoints();
        let Ok(entries) = std::fs::read_dir(&checkpoints) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(PARTIAL_PREFIX)
            {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|err| io_error(&path, err))?;
            }
        }
        Ok(())
    }

    /// The metrics log, opened for appending; with `upto`, first cut back to the lines of steps
    /// up to it (a resumed run writes the later steps again). Lines without a step, or torn by a
    /// kill, are dropped then too.
    pub fn metrics(&self, upto: Option<u64>) -> Result<MetricsLog, StoreError> {
        let path = self.root.join(METRICS_FILE);
        match upto {
            Some(step) if path.exists() => {
                let text = std::fs::read_to_string(&path).map_err(|err| io_error(&path, err))?;
                let kept: String = text
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s <= step)
                    })
                    .flat_map(|line| [line, "\n"])
                    .collect();
                crate::store::safetensors::write_atomic(&path, kept.as_bytes())
                    .map_err(StoreError)?;
            }
            Some(_) => {}
            None => crate::store::safetensors::write_atomic(&path, b"").map_err(StoreError)?,
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|err| io_error(&path, err))?;
        Ok(MetricsLog {
            path,
            file: Some(file),
        })
    }
}

/// `metrics.jsonl`: one JSON object a line, each written whole by one `write` (O_APPEND), so a
/// kill leaves at most one torn last line, which a resume drops.
pub struct MetricsLog {
    path: PathBuf,
    /// `None`: the log of a process that does not report for its job (rank 0 does).
    file: Option<File>,
}

impl MetricsLog {
    /// The log of a process whose lines another process writes.
    pub fn unkept() -> Self {
        MetricsLog {
            path: PathBuf::new(),
            file: None,
        }
    }

    pub fn append(&mut self, line: &serde_json::Value) -> Result<(), StoreError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut text = line.to_string();
        text.push('\n');
        file.write_all(text.as_bytes())
            .map_err(|err| io_error(&self.path, err))
    }
}

/// A checkpoint read whole and checked against its manifest.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
    files: BTreeMap<String, Vec<u8>>,
}

impl Checkpoint {
    /// Every file of the checkpoint, by name.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(n, b)| (n.as_str(), b.as_slice()))
    }

    /// A file of the checkpoint, by name.
    pub fn file(&self, name: &str) -> Result<&[u8], StoreError> {
        self.files.get(name).map(Vec::as_slice).ok_or_else(|| {
            StoreError(format!(
                "{}: the checkpoint has no {name} (its manifest does not list it)",
                self.dir.display()
            ))
        })
    }
}

/// The newest checkpoint of the run in `run_dir`, verified; `None` when it has none. Readers
/// that do not own the run (exports, later pipeline stages) use this too: checkpoints are
/// never changed once in place.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<Checkpoint>, StoreError> {
    let steps = complete_steps(&run_dir.join(CHECKPOINTS))?;
    let Some((step, dir)) = steps.last() else {
        return Ok(None);
    };
    let checkpoint = read_verified(dir, *step).map_err(|err| {
        let earlier = match steps.len() {
            1 => String::from("it is the run's only checkpoint: start the run over (--restart)"),
            _ => format!(
                "move it away to continue from the checkpoint of step {}",
                steps[steps.len() - 2].0
            ),
        };
        StoreError(format!(
            "the checkpoint {} is damaged: {}; {earlier}",
            dir.display(),
            err.0
        ))
    })?;
    Ok(Some(checkpoint))
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// The complete checkpoints under `checkpoints`, oldest first.
fn complete_steps(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let entries = match std::fs::read_dir(checkpoints) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error(checkpoints, err)),
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let step = name.to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((step, entry.path()))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: u64,
    step: u64,
    files: BTreeMap<String, FileEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

/// What a process wrote of a checkpoint: one file's length and SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl FileDigest {
    /// Values in one digest's [`FileDigest::to_words`].
    pub const WORDS: usize = 4 + 16;

    /// The digest as 16-bit pieces in f32s, which f32 holds exactly, so that a job's sum
    /// all-reduce (everyone else adding zeros) carries it to the process writing the manifest.
    pub fn to_words(&self) -> [f32; Self::WORDS] {
        let mut words = [0.0; Self::WORDS];
        let pairs = self.bytes.to_le_bytes().into_iter().chain(self.sha256);
        let pairs: Vec<u8> = pairs.collect();
        for (word, pair) in words.iter_mut().zip(pairs.chunks(2)) {
            *word = f32::from(u16::from_le_bytes([pair[0], pair[1]]));
        }
        words
    }

    /// The digest back from [`FileDigest::to_words`]; `None` unless each word is a 16-bit
    /// whole number.
    pub fn from_words(words: &[f32]) -> Option<Self> {
        let mut bytes = Vec::with_capacity(2 * Self::WORDS);
        for &w in words.get(..Self::WORDS)? {
            if !(0.0..=65535.0).contains(&w) || w.fract() != 0.0 {
                return None;
            }
            bytes.extend((w as u16).to_le_bytes());
        }
        Some(FileDigest {
            bytes: u64::from_le_bytes(bytes[..8].try_into().ok()?),
            sha256: bytes[8..].try_into().ok()?,
        })
    }
}

impl From<FileDigest> for FileEntry {
    fn from(d: FileDigest) -> Self {
        FileEntry {
            bytes: d.bytes,
            sha256: hex(&d.sha256),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the checkpoint of `step` of the run in `run_dir` is written before it is complete.
pub fn partial_checkpoint(run_dir: &Path, step: u64) -> PathBuf {
    run_dir
        .join(CHECKPOINTS)
        .join(format!("{PARTIAL_PREFIX}{}", step_dir_name(step)))
}

/// Writes one file of a checkpoint being saved into its directory (`partial`, which
/// [`RunDir::begin`] made), flushed to disk; any process of the job may write one.
pub fn write_checkpoint_file(
    partial: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<FileDigest, StoreError> {
    write_synced(&partial.join(name), bytes)?;
    Ok(FileDigest {
        bytes: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
    })
}

/// Reads the checkpoint in `dir` and checks every file against its manifest.
fn read_verified(dir: &Path, step: u64) -> Result<Checkpoint, StoreError> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(|err| io_error(&manifest_path, err))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|err| {
        StoreError(format!(
            "{} is not a checkpoint manifest: {err}",
            manifest_path.display()
        ))
    })?;
    if !READS.contains(&manifest.format) {
        return Err(StoreError(format!(
            "{} is of checkpoint format {}; this Kiln reads formats 1 to {FORMAT}",
            manifest_path.display(),
            manifest.format
        )));
    }
    if manifest.step != step {
        return Err(StoreError(format!(
            "{} says step {}, its directory step {step}",
            manifest_path.display(),
            manifest.step
        )));
    }
    let mut files = BTreeMap::new();
    for (name, entry) in &manifest.files {
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(StoreError(format!(
                "{} lists `{name}`, not a file of the checkpoint's directory",
                manifest_path.display()
            )));
        }
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|err| io_error(&path, err))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(StoreError(format!(
                "{} has {} bytes, its manifest says {}",
                path.display(),
                bytes.len(),
                entry.bytes
            )));
        }
        if hex(&Sha256::digest(&bytes)) != entry.sha256 {
            return Err(StoreError(format!(
                "{}'s contents differ from what was saved (SHA-256 mismatch)",
                path.display()
            )));
        }
        files.insert(name.clone(), bytes);
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        step,
        files,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path).map_err(|err| io_error(path, err))?;
    file.write_all(bytes).map_err(|err| io_error(path, err))?;
    file.sync_all().map_err(|err| io_error(path, err))
}

/// Makes a directory's entries (a created or renamed file) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| io_error(dir, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-run-dir-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        dir
    }

    #[test]
    fn keeps_the_newest_checkpoints_and_reads_them_back_verified() {
        let runs = scratch("keep");
        let dir = RunDir::lock(&runs, "e").unwrap();
        for step in 1..=4u64 {
            let bytes = step.to_le_bytes();
            dir.save(step, &[("a.bin", &bytes)], 2).unwrap();
        }
        let steps: Vec<u64> = complete_steps(&runs.join("e/checkpoints"))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [3, 4]);
        let latest = dir.latest().unwrap().unwrap();
        assert_eq!(latest.step, 4);
        assert_eq!(latest.file("a.bin").unwrap(), 4u64.to_le_bytes());
        std::fs::remove_dir_all(&runs).ok();
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_with_the_earlier_one_named() {
        let runs = scratch("damaged");
        let dir = RunDir::lock(&runs, "e").unwrap();
        dir.save(1, &[("a.bin", b"one")], 3).unwrap();
        let newest = dir.save(2, &[("a.bin", b"two")], 3).unwrap();
        std::fs::write(newest.join("a.bin"), b"tw0").unwrap();
        let err = dir.latest().err().unwrap().0;
        assert!(err.contains("SHA-256") && err.contains("step 1"), "{err}");
        std::fs::remove_file(newest.join("a.bin")).unwrap();
        let err = dir.latest().err().unwrap().0;
        assert!(err.contains("a.bin"), "{err}");
        std::fs::remove_dir_all(&runs).ok();
    }

    #[test]
    fn a_second_owner_is_refused_and_partial_saves_are_never_read() {
        let runs = scratch("owner");
        let first = RunDir::lock(&runs, "e").unwrap();
        let err = RunDir::lock(&runs, "e").err().unwrap().0;
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // A save killed half way: a partial directory, which the next owner removes.
        let partial = runs.join("e/checkpoints/.partial-step-0000000007");
        std::fs::create_dir_all(&partial).unwrap();
        assert!(first.latest().unwrap().is_none());
        drop(first);
        let _second = RunDir::lock(&runs, "e").unwrap();
        assert!(!partial.exists());
        std::fs::remove_dir_all(&runs).ok();
    }

    #[test]
    fn a_checkpoint_of_several_writers_lists_what_each_wrote() {
        let runs = scratch("writers");
        let dir = RunDir::lock(&runs, "e").unwrap();
        let partial = dir.begin(5).unwrap().unwrap();
        // Another process's file, its digest carried as f32 words.
        let theirs = write_checkpoint_file(&partial, "b.bin", b"theirs").unwrap();
        let carried = FileDigest::from_words(&theirs.to_words()).unwrap();
        assert_eq!(carried, theirs);
        let written = BTreeMap::from([("b.bin".to_string(), carried)]);
        dir.commit(5, written, &[("a.bin", b"mine")], 2).unwrap();
        let latest = dir.latest().unwrap().unwrap();
        assert_eq!(latest.file("a.bin").unwrap(), b"mine");
        assert_eq!(latest.file("b.bin").unwrap(), b"theirs");
        assert!(dir.begin(5).unwrap().is_none(), "in place already");
        // A file reported but not there (a process writing elsewhere): nothing is committed.
        dir.begin(6).unwrap().unwrap();
        let ghost = BTreeMap::from([("c.bin".to_string(), carried)]);
        let err = dir.commit(6, ghost, &[], 2).unwrap_err().0;
        assert!(err.contains("c.bin") && err.contains("intact"), "{err}");
        assert_eq!(dir.newest_step().unwrap(), Some(5));
        assert!(!partial_checkpoint(dir.path(), 6).exists());
        std::fs::remove_dir_all(&runs).ok();
    }

    #[test]
    fn resumed_metrics_are_cut_back_to_the_checkpoint() {
        let runs = scratch("metrics");
        let dir = RunDir::lock(&runs, "e").unwrap();
        let mut log = dir.metrics(None).unwrap();
        for step in 1..=5 {
            log.append(&serde_json::json!({ "step": step })).unwrap();
        }
        drop(log);
        let path = runs.join("e/metrics.jsonl");
        let mut torn = std::fs::read_to_string(&path).unwrap();
        torn.push_str("{\"step\": 6, \"lo");
        std::fs::write(&path, torn).unwrap();
        drop(dir.metrics(Some(3)).unwrap());
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
        std::fs::remove_dir_all(&runs).ok();
    }
}
