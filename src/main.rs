//! The `mailer` binary: parse the command line, run it, print any error once, exit with its code.

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
            eprintln!("error: {error:#}");
            mailer::exit::Exit::of_error(&error).into()
        }
    }
}
