//! The `mailer` binary: parse the command line, run it, print any error once, exit with its code.

use std::io::Write as _;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match mailer::cli::Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(usage) => return usage.exit_code(),
    };
    match mailer::run(&cli) {
        Ok(exit) => exit.into(),
        Err(error) => {
            // Values in errors are escaped where they are named; this is the last guard, for
            // any that was not: no control character but our own line breaks reaches the
            // terminal. Not `eprintln!`, which panics when standard error is closed.
            let text = format!("{error:#}");
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {}",
                mailer::printable::escape_keeping_lines(&text)
            );
            mailer::exit::Exit::of_error(&error).into()
        }
    }
}
