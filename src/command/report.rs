//! `mailer report`: one row per recipient, from the journal, as CSV or JSON.

use std::path::Path;

use super::{Access, journal_for};
use crate::cli;
use crate::exit::Exit;
use crate::journal;
use crate::report;

pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    format: cli::ReportFormat,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (_, journal) = journal_for(path, state_dir, Access::Read)?;
    write(&journal, format, out).map_err(journal::named(journal.path()))?;
    Ok(Exit::Complete)
}

/// Every row of the latest slot, in `format`.
fn write(
    journal: &journal::Journal,
    format: cli::ReportFormat,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let slot = journal.latest_slot()?.unwrap_or_default();
    match format {
        cli::ReportFormat::Csv => {
            let mut csv = csv::Writer::from_writer(out);
            csv.write_record(report::REPORT_COLUMNS)?;
            journal.rows(&slot, |row| Ok(csv.write_record(report::csv_fields(&row))?))?;
            csv.flush()?;
        }
        cli::ReportFormat::Json => {
            write!(out, "[")?;
            let mut first = true;
            journal.rows(&slot, |row| {
                if !first {
                    write!(out, ",")?;
                }
                first = false;
                writeln!(out)?;
                serde_json::to_writer(&mut *out, &row)?;
                Ok(())
            })?;
            writeln!(out, "\n]")?;
        }
    }
    Ok(())
}
