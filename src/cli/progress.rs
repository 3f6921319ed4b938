//! What `kiln run` shows while it trains: a progress bar on a terminal; elsewhere (a log file,
//! CI, a batch job) one line every few seconds, so that a long run is never silent.

use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::train::Event;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between progress lines when there is no terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(10);
/// Parameters named in the notice of those started fresh.
const NAMES_SHOWN: usize = 8;

pub struct Progress {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
    /// When the last line was printed (no terminal), and the step training started from.
    last_line: Option<Instant>,
    first_step: u64,
}

impl Progress {
    pub fn new(name: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            name: name.to_string(),
            bar,
            started: Instant::now(),
            last_line: None,
            first_step: 0,
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn show(&mut self, event: &Event) {
        match event {
            Event::Started {
                resumed_from,
                total,
                initialised,
                gpus,
            } => {
                for gpu in gpus.iter() {
                    self.say(format!("training on {gpu}"));
                }
                if let Some(bar) = &self.bar {
                    bar.set_length(*total);
                }
                self.first_step = resumed_from.unwrap_or(0);
                self.started = Instant::now();
                if let Some(step) = resumed_from {
                    self.say(format!(
                        "resuming `{}` from its checkpoint of step {step}",
                        self.name
                    ));
                }
                if !initialised.is_empty() {
                    let shown = &initialised[..initialised.len().min(NAMES_SHOWN)];
                    let more = initialised.len() - shown.len();
                    self.say(format!(
                        "{} parameters the named checkpoints do not hold start from fresh values: {}{}",
                        initialised.len(),
                        shown.join(", "),
                        if more > 0 { format!(", and {more} more") } else { String::new() }
                    ));
                }
            }
            Event::Step(r) => {
                if let Some(bar) = &self.bar {
                    bar.set_length(r.total);
                    bar.set_position(r.step);
                    bar.set_message(format!(
                        "loss {:.4} | {:.0} tokens/s",
                        r.loss, r.tokens_per_second
                    ));
                    return;
                }
                let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL);
                if due || r.step == r.total {
                    self.last_line = Some(Instant::now());
                    let done = r.step.saturating_sub(self.first_step).max(1);
                    let per_step = self.started.elapsed().as_secs_f64() / done as f64;
                    let eta = per_step * r.total.saturating_sub(r.step) as f64;
                    eprintln!(
                        "{}: step {}/{} | loss {:.4} | {:.0} tokens/s | ETA {}",
                        self.name,
                        r.step,
                        r.total,
                        r.loss,
                        r.tokens_per_second,
                        duration(eta)
                    );
                }
            }
            Event::Evaluated { step, loss } => {
                self.say(format!("{}: step {step} | eval loss {loss:.4}", self.name));
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1h02m`, `3m05s`, `42s`.
fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}
