//! Nothing lost: a training process killed at any moment (start-up, mid-step, mid-save) resumes to
//! exactly the weights and losses of a run never interrupted, and a save that fails for want of
//! space leaves the previous checkpoint intact and the run resumable.

mod common;

use common::{kiln_run, scratch, succeeded, KILN};
use kiln_runtime::tensor::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// A small run of the quick-start's data with dropout on (so the resumed run must redraw the
/// same masks), saving after every step so that kills often land inside a save.
fn experiment_file(dir: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let file = dir.join("crash.kiln");
    std::fs::write(
        &file,
        format!(
            "import \"{}/quickstart.kiln\"\n\
             experiment crash = quickstart {{\n\
               model {{ hidden = 32, layers = 2, heads = 2, positions = 64, dropout = 0.1 }}\n\
               train {{ schedule = constant, batch = 4, seq_len = 32, steps = {steps}, checkpoint_every = {checkpoint_every}, keep_checkpoints = 2 }}\n\
             }}\n",
            examples.display()
        ),
    )
    .unwrap();
    file
}

/// The newest checkpoint's trainable weights, whole (compared bit for bit).
fn final_weights(run: &Path) -> BTreeMap<String, HostTensor> {
    let newest = kiln_runtime::store::run_dir::latest_checkpoint(run)
        .unwrap()
        .expect("a checkpoint");
    kiln_runtime::store::sharded::saved_weights(&newest).unwrap()
}

/// Each step's loss, learning rate and gradient norm, and each evaluation (not throughput,
/// which is timing).
fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v.to_string()
        })
        .collect()
}

/// A deterministic sequence in [0, 1) (the kill times must be reproducible).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Lines of the run's metrics log (0 before it exists).
fn logged_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until the run has logged `lines` lines or `child` has exited (or a minute passed).
fn wait_for_lines(run: &Path, lines: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while logged_lines(run) < lines
        && child.try_wait().unwrap().is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn random_kills_resume_to_the_uninterrupted_run() {
    let dir = scratch("crash-kills");
    let file = experiment_file(&dir, 120, 1);
    let (whole, killed) = (dir.join("whole"), dir.join("killed"));
    succeeded(&kiln_run(&file, &whole, &[]).output().unwrap());

    let run = killed.join("crash");
    let mut rng = Lcg(12);
    let (mut kills, mut mid_save) = (0, 0);
    for attempt in 0..20 {
        let mut child = kiln_run(&file, &killed, &["--resume"]).spawn().unwrap();
        if attempt % 5 == 0 {
            // During start-up: reading the checkpoint, the data, the tokenizer.
            std::thread::sleep(std::time::Duration::from_millis(
                (300.0 * rng.next()) as u64,
            ));
        } else {
            // A few steps in, then at a random moment of a step or of its save (every step
            // saves): the log is cut back to the checkpoint on resume, so count from there.
            let from = logged_lines(&run);
            wait_for_lines(&run, from + 1 + (5.0 * rng.next()) as usize, &mut child);
            std::thread::sleep(std::time::Duration::from_micros(
                (20_000.0 * rng.next()) as u64,
            ));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        let partial = std::fs::read_dir(run.join("checkpoints")).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".partial"))
        });
        mid_save += usize::from(partial);
        // Killed, or it finished: never an error.
        assert!(
            out.status.code().is_none_or(|c| c == 0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Whatever the kill interrupted, what is on disk is complete and verifies.
        kiln_runtime::store::run_dir::latest_checkpoint(&run).unwrap();
    }
    assert!(kills >= 15, "only {kills} of the attempts were killed");
    let reached = kiln_runtime::store::run_dir::latest_checkpoint(&run)
        .unwrap()
        .map_or(0, |c| c.step);
    assert!(
        reached >= 20,
        "the kills landed in training: step {reached} reached"
    );
    // How many landed inside a save depends on how long this disk takes to flush.
    eprintln!("{kills} kills, {mid_save} inside a save; step {reached} reached");
    succeeded(&kiln_run(&file, &killed, &["--resume"]).output().unwrap());

    let (a, b) = (whole.join("crash"), killed.join("crash"));
    assert_eq!(
        losses(&a),
        losses(&b),
        "the same steps, losses and evaluation"
    );
    assert!(
        final_weights(&a) == final_weights(&b),
        "bit-identical weights"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A file system of `bytes` at `dir`: a tmpfs where this process may mount one (root),
/// unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        Command::new("umount").arg(&self.0).status().ok();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.metadata().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes() {
    let dir = scratch("crash-disk");
    let file = experiment_file(&dir, 6, 2);
    let whole = dir.join("whole");
    succeeded(&kiln_run(&file, &whole, &[]).output().unwrap());
    let checkpoint = kiln_runtime::store::run_dir::latest_checkpoint(&whole.join("crash"))
        .unwrap()
        .unwrap()
        .dir;
    let one_checkpoint = dir_bytes(&checkpoint);

    // Room for the first checkpoint and the metrics, not for a second checkpoint beside it.
    let small = dir.join("small");
    let disk = SmallDisk::mount(&small, one_checkpoint * 3 / 2 + (64 << 10));
    let failed = match &disk {
        Some(_) => kiln_run(&file, &small, &[]).output().unwrap(),
        // No tmpfs here: the same failure as a file-size limit (`ulimit -f`, in KiB), after a
        // first run has saved step 2.
        None => {
            succeeded(&kiln_run(&file, &small, &["--steps", "2"]).output().unwrap());
            let limit = (one_checkpoint / 2 / 1024).to_string();
            let mut cmd = Command::new("bash");
            cmd.args(["-c", "ulimit -f \"$0\" && exec \"$@\"", &limit, KILN, "run"])
                .arg(&file)
                .arg("--runs")
                .arg(&small)
                .arg("--resume");
            cmd.output().unwrap()
        }
    };
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot save the checkpoint of step 4")
            && stderr.contains("the previous checkpoint is intact"),
        "{stderr}"
    );
    let run = small.join("crash");
    let kept = kiln_runtime::store::run_dir::latest_checkpoint(&run)
        .unwrap()
        .expect("the step-2 checkpoint survives");
    assert_eq!(kept.step, 2);
    let leftovers: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        ["step-0000000002"],
        "the failed save left nothing"
    );

    // Space freed (here: the run moved to a roomy disk), it resumes to the uninterrupted run.
    let moved = dir.join("moved");
    copy_dir(&small, &moved);
    drop(disk);
    succeeded(&kiln_run(&file, &moved, &["--resume"]).output().unwrap());
    assert_eq!(losses(&whole.join("crash")), losses(&moved.join("crash")));
    assert!(final_weights(&whole.join("crash")) == final_weights(&moved.join("crash")));
    std::fs::remove_dir_all(&dir).ok();
}

/// Waits for `child`, which an interrupt should have ended (status 130); its output.
fn interrupted(child: std::process::Child) -> Output {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    out
}

#[cfg(unix)]
fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: sends a signal to a child this test spawned and has not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[cfg(unix)]
#[test]
fn an_interrupt_saves_where_the_run_stopped_and_a_second_exits_at_once() {
    let dir = scratch("crash-interrupt");
    let file = experiment_file(&dir, 100_000, 100_000);
    let runs = dir.join("runs");
    let run = runs.join("crash");

    let mut child = kiln_run(&file, &runs, &[]).spawn().unwrap();
    wait_for_lines(&run, 3, &mut child);
    signal(&child, libc::SIGINT);
    let out = interrupted(child);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    let saved = kiln_runtime::store::run_dir::latest_checkpoint(&run)
        .unwrap()
        .unwrap();
    let logged = losses(&run)
        .iter()
        .filter(|l| l.contains("\"loss\""))
        .count() as u64;
    assert_eq!(
        saved.step, logged,
        "the checkpoint is of the last step logged"
    );

    // Two signals: the second ends the process at once, whatever the first had started.
    let mut child = kiln_run(&file, &runs, &["--resume"]).spawn().unwrap();
    wait_for_lines(&run, logged as usize + 2, &mut child);
    signal(&child, libc::SIGTERM);
    signal(&child, libc::SIGINT);
    interrupted(child);
    kiln_runtime::store::run_dir::latest_checkpoint(&run)
        .unwrap()
        .expect("a checkpoint, complete");
    std::fs::remove_dir_all(&dir).ok();
}
