//! Progress while sending: a bar with rate and ETA on a terminal, a log line every
//! [`LOG_EVERY`] otherwise (cron, pipes, `--log-format json`).
//!
//! I/O: draws on standard error. Log lines written while the bar is up go through
//! [`BarSafeStderr`], which lifts the bar out of the way first.

use std::io::{self, Write};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::State;

/// How often progress is logged when there is no bar.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bar on screen, if any, for [`BarSafeStderr`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Standard error for log lines: suspends the progress bar while a line is written, so log
/// lines and the bar do not overwrite each other.
#[derive(Default)]
pub struct BarSafeStderr;

impl Write for BarSafeStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match active() {
            Some(bar) => bar.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    sent: u64,
    started: Instant,
    logged: Instant,
}

impl Progress {
    /// `total`: the messages this run will try. `interactive`: draw a bar (else log lines).
    #[must_use]
    pub fn new(total: u64, interactive: bool) -> Progress {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            // The template is a constant; a typo would show in every interactive run.
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} {rate} ETA {eta} {msg}",
            ) {
                let style = style
                    .with_key(
                        "rate",
                        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.0}/s", state.per_sec());
                        },
                    )
                    .progress_chars("=> ");
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            done: 0,
            sent: 0,
            started: now,
            logged: now,
        }
    }

    /// One recipient reached its outcome for this run.
    pub fn advance(&mut self, state: State) {
        self.done += 1;
        if state == State::Sent {
            self.sent += 1;
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if state != State::Sent {
                bar.set_message(format!("{} not sent", self.done - self.sent));
            }
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.logged) >= LOG_EVERY {
            self.logged = now;
            let elapsed = now.duration_since(self.started).as_secs_f64();
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            let rate = self.done as f64 / elapsed;
            #[allow(clippy::cast_precision_loss)]
            let eta_seconds = ((self.total - self.done) as f64 / rate).round();
            tracing::info!(
                done = self.done,
                total = self.total,
                sent = self.sent,
                per_second = rate.round(),
                eta_seconds,
                "progress"
            );
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
