//! `mailer preview`: sample messages as `.eml` files and an HTML gallery per locale, or one
//! row's message on standard output (`--show`).

use std::io::Write as _;
use std::path::Path;

use crate::exit::Exit;
use crate::pipeline::{self, prepare};
use crate::printable::escape_keeping_lines;
use crate::problem;
use crate::recipients::Recipient;
use crate::report;

/// `mailer preview`: everything is rendered, read back and checked before anything is
/// written or printed, so an unknown `--recipient` or `--show` line leaves no files behind.
pub fn run(
    path: &Path,
    out: Option<&Path>,
    request: &report::preview::Request<'_>,
    show: Option<u64>,
    stdout: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let date = crate::clock::now();
    let (loaded, validation) = pipeline::load_valid(path, date, 0)?;
    let render = |recipient: &Recipient| prepare(&loaded, recipient, date);
    let shown = show
        .map(|line| report::preview::show(&loaded.list, line, render))
        .transpose()?;
    let gallery = match out {
        None => None,
        Some(out) => {
            let list = &loaded.list;
            let counts = report::preview::Counts::new(
                &validation.summary,
                list.suppressed.len(),
                validation.problems.errors_of(problem::Kind::Row),
                list.duplicates.len(),
            );
            let mut preview = report::preview::collect(
                &loaded.campaign.id,
                list,
                loaded.renderer.locales(),
                counts,
                request,
                render,
            )?;
            preview.locale_requests = pipeline::locale_requests(&loaded).lines();
            Some((out, preview))
        }
    };
    if let Some(shown) = shown {
        // The decoded message holds the row's cells: shown, not played on the terminal.
        write!(stdout, "{}", escape_keeping_lines(&shown))?;
    }
    if let Some((out, preview)) = gallery {
        let written = report::preview::write(out, &preview, &report::gallery::page(&preview))?;
        for line in written {
            // With `--show`, standard output is the message alone.
            let line = escape_keeping_lines(&line);
            if show.is_some() {
                // Not `eprintln!`, which panics when standard error is closed.
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            } else {
                writeln!(stdout, "{line}")?;
            }
        }
    }
    Ok(Exit::Complete)
}
