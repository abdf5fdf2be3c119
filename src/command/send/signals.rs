//! Signals during a send: the first SIGINT, SIGTERM or SIGHUP stops this run gracefully — no
//! new message starts, those on the wire get their reply, everything is recorded, exit 75 —
//! and a second one ends the process at once, as the signal would have without mailer.
//! Unlike `mailer stop`, nothing sticks: the next send goes on.
//!
//! I/O: a thread that waits for the signals.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::watch;

/// Watches for the signals while it lives; dropping it stops watching.
pub struct Interrupts {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Becomes `Some("SIGTERM")` (say) on the first signal.
    pub received: watch::Receiver<Option<String>>,
}

impl Interrupts {
    /// Starts watching.
    pub fn watch() -> anyhow::Result<Interrupts> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| anyhow::anyhow!("cannot watch for signals: {e}"))?;
        let handle = signals.handle();
        let (sender, received) = watch::channel(None);
        let thread = std::thread::spawn(move || {
            let mut seen = false;
            for signal in signals.forever() {
                if seen {
                    // The second one: the default action, at once (the process ends).
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    continue;
                }
                seen = true;
                let name = match signal {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                tracing::warn!(
                    signal = name,
                    "stopping: no new message starts; those on the wire get their reply (a second signal ends at once)"
                );
                let _ = sender.send(Some(name.to_owned()));
            }
        });
        Ok(Interrupts {
            handle,
            thread: Some(thread),
            received,
        })
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A write beyond the file-size limit (`ulimit -f`) sends SIGXFSZ, whose default action kills
/// the process before the error can be handled. With a handler in place the write fails
/// instead, and mailer stops with exit 74 naming the file, like on a full disk.
pub fn survive_file_size_limit() {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGXFSZ, flag);
}
