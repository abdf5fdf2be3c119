//! A small builder for campaign folders in a temporary directory, and a runner for the real
//! binary. Every campaign starts from the repository's example templates and locales.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::sink::Sink;

pub struct Campaign {
    dir: tempfile::TempDir,
    rows: Vec<String>,
    header: String,
    transport: String,
    transport_keys: String,
    retry: String,
    extra: String,
}

/// Retries and relay pauses in milliseconds, so tests of faults finish quickly.
const FAST_RETRY: &str =
    "backoff = \"20ms\"\nmax_backoff = \"100ms\"\nrelay_backoff = \"20ms\"\nlinger = \"5s\"\n";

/// What a run of the binary gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    /// The signal that ended it, if one did (then `code` is -1).
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(output: std::process::Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            signal: std::os::unix::process::ExitStatusExt::signal(&output.status),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// A `send` on another process, for tests that act while it runs. Killed if the test fails.
pub struct Running(Option<Child>);

impl Running {
    /// `send CAMPAIGN` (approved) with `extra` arguments.
    pub fn send(path: &Path, extra: &[&str]) -> Running {
        let mut args = vec!["send", path.to_str().unwrap()];
        args.extend(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_mailer"))
            .args(approved(&args))
            .env_remove("MAILER_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    pub fn still_running(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Its log (standard error), read on a thread as it comes.
    pub fn log(&mut self) -> Log {
        let stderr = self.0.as_mut().unwrap().stderr.take().unwrap();
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = {
            let text = std::sync::Arc::clone(&text);
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut text = text.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            })
        };
        Log {
            text,
            reader: Some(reader),
        }
    }

    /// Sends it the signal `name` (`TERM`, `INT`, …), with the shell's own `kill` (a machine
    /// may have no `kill` program).
    pub fn signal(&self, name: &str) {
        let pid = self.id().to_string();
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -{name} {pid}")])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// SIGKILL now.
    pub fn kill(mut self) -> Run {
        let mut child = self.0.take().unwrap();
        let _ = child.kill();
        Run::from(child.wait_with_output().unwrap())
    }

    /// Waits for it to end.
    pub fn finish(mut self) -> Run {
        Run::from(self.0.take().unwrap().wait_with_output().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running send's log, as far as it has come.
pub struct Log {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Log {
    pub fn contains(&self, needle: &str) -> bool {
        self.text.lock().unwrap().contains(needle)
    }

    /// What it holds so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// The whole log, once the process has ended.
    pub fn finish(mut self) -> String {
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.text()
    }
}

/// Waits for `condition`; the limit only keeps a broken build from hanging the suite.
pub fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "gave up waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

impl Campaign {
    /// The example's templates and locales, no rows yet, the file transport.
    pub fn example() -> Campaign {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        copy_dir(&repo.join("templates"), &dir.path().join("templates"));
        copy_dir(&repo.join("locales"), &dir.path().join("locales"));
        Campaign {
            dir,
            rows: vec![],
            header: "email,name,locale,plan".to_owned(),
            transport: "kind = \"file\"\noutbox = \"outbox\"\n".to_owned(),
            transport_keys: String::new(),
            retry: FAST_RETRY.to_owned(),
            extra: String::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn header(mut self, header: &str) -> Campaign {
        header.clone_into(&mut self.header);
        self
    }

    pub fn row(mut self, row: &str) -> Campaign {
        self.rows.push(row.to_owned());
        self
    }

    pub fn rows(mut self, rows: impl IntoIterator<Item = String>) -> Campaign {
        self.rows.extend(rows);
        self
    }

    /// Replaces the transport's kind and location (keys added with `transport` stay).
    pub fn transport_kind(mut self, keys: &str) -> Campaign {
        self.transport = format!("{keys}\n");
        self
    }

    /// SMTP to the sink over `connections` connections.
    pub fn smtp(mut self, sink: &Sink, connections: usize) -> Campaign {
        self.transport = format!(
            "kind = \"smtp\"\nurl = \"smtp://127.0.0.1:{}\"\nconnections = {connections}\n",
            sink.port()
        );
        self
    }

    /// More keys for the `[transport]` section.
    pub fn transport(mut self, keys: &str) -> Campaign {
        self.transport_keys.push_str(keys);
        self.transport_keys.push('\n');
        self
    }

    /// Keys for the `[retry]` section, on top of fast backoffs (later keys win).
    pub fn retry(mut self, keys: &str) -> Campaign {
        let overridden: Vec<&str> = keys
            .lines()
            .filter_map(|l| l.split('=').next())
            .map(str::trim)
            .collect();
        let mut kept = String::new();
        for line in FAST_RETRY.lines() {
            if !overridden.contains(&line.split('=').next().unwrap().trim()) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        kept.push_str(keys);
        kept.push('\n');
        self.retry = kept;
        self
    }

    /// Raw TOML appended after everything else.
    pub fn extra(mut self, toml: &str) -> Campaign {
        self.extra.push_str(toml);
        self
    }

    /// Overwrites (or adds) a file in the campaign folder.
    pub fn file(self, relative: &str, text: &str) -> Campaign {
        let path = self.dir.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        self
    }

    /// Writes campaign.toml and the CSV; returns the campaign file's path.
    pub fn write(&self) -> PathBuf {
        let mut csv = self.header.clone();
        csv.push('\n');
        for row in &self.rows {
            csv.push_str(row);
            csv.push('\n');
        }
        std::fs::write(self.dir.path().join("recipients.csv"), csv).unwrap();
        let toml = format!(
            "[campaign]\nid = \"test-campaign\"\nfrom = \"Example <news@example.com>\"\nreply_to = \"support@example.com\"\n\
             template = \"templates\"\nlocales = \"locales\"\ndefault_locale = \"en\"\n\n\
             [recipients]\npath = \"recipients.csv\"\n\n[transport]\n{}{}\n[retry]\n{}\n{}",
            self.transport, self.transport_keys, self.retry, self.extra
        );
        let path = self.dir.path().join("campaign.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }

    /// Writes the campaign and runs `mailer <command> campaign.toml <args…>`.
    pub fn run(&self, command: &str, args: &[&str]) -> Run {
        let path = self.write();
        mailer(&[&[command, path.to_str().unwrap()], args].concat(), &[])
    }
}

/// `args` as an operator who reviewed the plan runs them: a `send` over SMTP gets
/// `--approve` with the fingerprint of the campaign's inputs as they are now, as `mailer plan`
/// prints it. Left as they are: dry runs, sends that already say `--approve`, campaign files
/// that do not parse (the send refuses them itself) and the file transport.
pub fn approved(args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let Some(at) = args.iter().position(|a| a == "send") else {
        return args;
    };
    if args.iter().any(|a| a == "--dry-run" || a == "--approve") {
        return args;
    }
    let Some(path) = args.get(at + 1).map(PathBuf::from) else {
        return args;
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return args;
    };
    if let Ok(campaign) = mailer::config::parse(&path, &text)
        && matches!(campaign.transport, mailer::config::Transport::Smtp(_))
    {
        let inputs = mailer::plan::fingerprint::inputs(&campaign).unwrap();
        args.push("--approve".to_owned());
        args.push(mailer::plan::fingerprint::combine(&inputs));
    }
    args
}

/// Runs the real binary with `args` (a `send` approved, see [`approved`]) and extra
/// environment variables.
pub fn mailer(args: &[&str], env: &[(&str, &str)]) -> Run {
    let args = approved(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    unapproved(&args, env)
}

/// Runs the real binary with exactly `args` and extra environment variables. The test
/// process's own `MAILER_LOG` is not passed on (runs log at the default level whatever the
/// shell says); one given in `env` is.
pub fn unapproved(args: &[&str], env: &[(&str, &str)]) -> Run {
    // Later changes to a `Command`'s environment win: the removal must come first.
    let output = Command::new(env!("CARGO_BIN_EXE_mailer"))
        .args(args)
        .env_remove("MAILER_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run::from(output)
}

/// `count` rows spread over the example's four locales (plus fallbacks), with names that need
/// HTML escaping and non-ASCII names.
pub fn people(count: usize) -> Vec<String> {
    const LOCALES: [&str; 5] = ["en", "fr", "fr-CA", "de", "es"];
    const NAMES: [&str; 4] = [
        "Zoë <b>&</b> Co",
        "Jean-Éric \"JE\" O'Hara",
        "Ольга",
        "Plain Name",
    ];
    (0..count)
        .map(|i| {
            let name = NAMES[i % NAMES.len()].replace('"', "\"\"");
            format!(
                "user{i}@example{}.com,\"{name} {i}\",{},plan{i}",
                i % 7,
                LOCALES[i % LOCALES.len()]
            )
        })
        .collect()
}
