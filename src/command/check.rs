//! `mailer check`: load everything, render and guard every recipient's message in memory, and
//! list every problem and warning. Writes nothing.

use std::path::Path;

use crate::config::{self, Campaign};
use crate::exit::Exit;
use crate::pipeline::{self, Loaded, Validation};
use crate::problem::{self, Problems};
use crate::render::locale::Mismatches;
use crate::report::Summary;

pub fn run(path: &Path, out: &mut impl std::io::Write) -> anyhow::Result<Exit> {
    let examination = match config::parse_file(path)? {
        Ok(campaign) => examine(campaign)?,
        Err(problems) => Examination::failed(problems),
    };
    examination.print(out)?;
    Ok(if examination.problems.errors() > 0 {
        Exit::InvalidInput
    } else {
        Exit::Complete
    })
}

/// What `check` found: the loaded campaign and its counts when it could be loaded, and every
/// problem.
pub struct Examination {
    pub loaded: Option<(Loaded, Summary)>,
    /// Messages that rendered and passed the guard.
    pub rendered: usize,
    pub problems: Problems,
    /// The requested locales no folder serves as asked.
    pub locale_requests: Mismatches,
}

impl Examination {
    pub fn failed(problems: Problems) -> Examination {
        Examination {
            loaded: None,
            rendered: 0,
            problems,
            locale_requests: Mismatches::default(),
        }
    }

    /// Whether `send` would go ahead: nothing wrong but the invalid rows `[safety]
    /// max_invalid` lets it skip.
    pub fn sendable(&self) -> bool {
        let Some((loaded, _)) = &self.loaded else {
            return false;
        };
        let rows = self.problems.errors_of(problem::Kind::Row);
        self.problems.errors() == rows && rows <= loaded.campaign.safety.max_invalid
    }

    /// `check`'s report.
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        if let Some((loaded, summary)) = &self.loaded {
            let list = &loaded.list;
            writeln!(
                out,
                "{} of {} messages rendered and checked",
                self.rendered,
                list.recipients.len()
            )?;
            writeln!(
                out,
                "{} invalid rows, {} duplicate rows, {} suppressed",
                list.invalid(),
                list.duplicates.len(),
                list.suppressed.len()
            )?;
            writeln!(out, "{}", summary.locale_line())?;
        }
        for group in self.problems.grouped() {
            writeln!(out, "{group}")?;
        }
        writeln!(
            out,
            "{} errors ({} in the campaign files, {} in rows, {} stopped by the guard), {} warnings",
            self.problems.errors(),
            self.problems.errors_of(problem::Kind::Input),
            self.problems.errors_of(problem::Kind::Row),
            self.problems.errors_of(problem::Kind::Guard),
            self.problems.warnings()
        )
    }
}

/// Loads, renders and guards every recipient, and checks the `[safety]` expectations.
pub fn examine(campaign: Campaign) -> anyhow::Result<Examination> {
    let secrets = pipeline::missing_secrets(&campaign);
    let loaded = match pipeline::load_campaign(campaign)? {
        Ok(loaded) => loaded,
        Err(mut problems) => {
            problems.extend(secrets);
            return Ok(Examination::failed(problems));
        }
    };
    let Validation {
        problems: rendering,
        summary,
        ..
    } = pipeline::validate(&loaded, crate::clock::now(), 0);
    let rendered = summary.locales.values().sum();
    let mut problems = loaded.list.problems.clone();
    problems.extend(rendering);
    problems.extend(secrets);
    problems.extend(pipeline::expectations(&loaded, &problems));
    problems.extend(pipeline::warnings(&loaded));
    let locale_requests = pipeline::locale_requests(&loaded);
    problems.extend(pipeline::request_warnings(&loaded, &locale_requests));
    Ok(Examination {
        loaded: Some((loaded, summary)),
        rendered,
        problems,
        locale_requests,
    })
}
