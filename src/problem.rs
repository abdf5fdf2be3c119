//! Problems found in the user's input, each naming the file and line (or CSV line) it is about.
//!
//! Pure. Every loader collects its problems here instead of stopping at the first, so that
//! `check` can show them all at once and `send` can refuse with the full list.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::exit::{Exit, Failure};
use crate::printable::Shown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Blocks sending.
    Error,
    /// Worth reading; does not block.
    Warning,
}

/// What a problem blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A message could leak or break the rules: the guard stopped it. Blocks every send.
    Guard,
    /// The campaign file, a template or a locale: blocks every send.
    Input,
    /// One recipient's row cannot be sent. Blocks the send unless `[safety] max_invalid`
    /// allows skipping it; the row is then recorded as invalid.
    Row,
}

/// One thing wrong with one place in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    pub severity: Severity,
    pub path: PathBuf,
    /// 1-based line in `path`; for the CSV, the line the record starts on.
    pub line: Option<u64>,
    pub message: String,
}

impl Problem {
    pub fn error(path: &Path, line: Option<u64>, message: impl Into<String>) -> Self {
        Problem {
            kind: Kind::Input,
            severity: Severity::Error,
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }

    pub fn warning(path: &Path, line: Option<u64>, message: impl Into<String>) -> Self {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(path, line, message)
        }
    }

    /// A recipient's row that cannot be sent.
    pub fn row(path: &Path, line: u64, message: impl Into<String>) -> Self {
        Problem {
            kind: Kind::Row,
            ..Problem::error(path, Some(line), message)
        }
    }

    /// A message the guard stopped.
    pub fn guard(path: &Path, line: u64, message: impl Into<String>) -> Self {
        Problem {
            kind: Kind::Guard,
            ..Problem::error(path, Some(line), message)
        }
    }
}

/// Shown, a problem's path and message have their control characters escaped: both may
/// hold what the input holds (a file name, an echoed cell).
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Shown(self.path.display()))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": {}", Shown(&self.message))
    }
}

/// The 1-based line on which byte `offset` of `source` stands.
#[must_use]
pub fn line_of(source: &str, offset: usize) -> u64 {
    let end = offset.min(source.len());
    let newlines = source.as_bytes()[..end].split(|&b| b == b'\n').count() - 1;
    newlines as u64 + 1
}

/// Problems found so far, in the order found.
#[derive(Debug, Default, Clone)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, problem: Problem) {
        self.0.push(problem);
    }

    pub fn extend(&mut self, other: impl IntoIterator<Item = Problem>) {
        self.0.extend(other);
    }

    #[must_use]
    pub fn errors(&self) -> usize {
        self.0
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }

    #[must_use]
    pub fn warnings(&self) -> usize {
        self.0.len() - self.errors()
    }

    /// Fails with every error listed when there is at least one; warnings pass.
    pub fn into_result(self) -> Result<Problems, Failure> {
        if self.errors() == 0 {
            Ok(self)
        } else {
            Err(self.into_failure())
        }
    }

    /// The failure that lists every error (exit 65).
    #[must_use]
    pub fn into_failure(self) -> Failure {
        let mut message = format!(
            "{} problem{} in the input; nothing was sent:",
            self.errors(),
            if self.errors() == 1 { "" } else { "s" }
        );
        for group in self
            .grouped()
            .iter()
            .filter(|g| g.first.severity == Severity::Error)
        {
            message.push_str("\n  ");
            message.push_str(&group.to_string());
        }
        Failure::new(Exit::InvalidInput, message)
    }
}

/// Problems with the same file, kind and message, shown once with the lines they occurred on.
#[derive(Debug, PartialEq, Eq)]
pub struct Group<'a> {
    pub first: &'a Problem,
    pub lines: Vec<u64>,
}

/// How many lines a group names before it only counts.
const LINES_SHOWN: usize = 5;

impl fmt::Display for Group<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lines.len() <= 1 {
            return self.first.fmt(f);
        }
        let shown: Vec<String> = self
            .lines
            .iter()
            .take(LINES_SHOWN)
            .map(u64::to_string)
            .collect();
        let more = self.lines.len().saturating_sub(LINES_SHOWN);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        write!(
            f,
            "{}: lines {}{tail} ({} rows)",
            Shown(self.first.path.display()),
            shown.join(", "),
            self.lines.len()
        )?;
        if self.first.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": {}", Shown(&self.first.message))
    }
}

impl Problems {
    /// Errors before warnings, then by kind; identical messages about the same file folded
    /// into one group, in the order first seen.
    #[must_use]
    pub fn grouped(&self) -> Vec<Group<'_>> {
        let mut sorted: Vec<&Problem> = self.0.iter().collect();
        sorted.sort_by_key(|p| (p.severity, p.kind));
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut index: std::collections::HashMap<(&Path, &str, Kind, Severity), usize> =
            std::collections::HashMap::new();
        for problem in sorted {
            let key = (
                problem.path.as_path(),
                problem.message.as_str(),
                problem.kind,
                problem.severity,
            );
            match index.get(&key) {
                Some(&at) if problem.line.is_some() => groups[at].lines.extend(problem.line),
                _ => {
                    index.insert(key, groups.len());
                    groups.push(Group {
                        first: problem,
                        lines: problem.line.into_iter().collect(),
                    });
                }
            }
        }
        groups
    }

    /// How many errors of each kind.
    #[must_use]
    pub fn errors_of(&self, kind: Kind) -> usize {
        self.0
            .iter()
            .filter(|p| p.severity == Severity::Error && p.kind == kind)
            .count()
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        let source = "a\nbb\nccc";
        assert_eq!(line_of(source, 0), 1);
        assert_eq!(line_of(source, 2), 2);
        assert_eq!(line_of(source, 5), 3);
        assert_eq!(line_of(source, 999), 3);
    }

    #[test]
    fn identical_messages_are_grouped_with_their_lines() {
        let mut problems = Problems::default();
        for line in 2..10 {
            problems.push(Problem::row(
                Path::new("r.csv"),
                line,
                "cannot render: text.hbs:2: `r.x` has no value",
            ));
        }
        problems.push(Problem::row(
            Path::new("r.csv"),
            12,
            "`bad` is not a valid address",
        ));
        problems.push(Problem::warning(Path::new("l/de"), None, "lacks `footer`"));
        problems.push(Problem::error(
            Path::new("c.toml"),
            Some(3),
            "unknown field",
        ));
        let shown: Vec<String> = problems.grouped().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "c.toml:3: unknown field",
                "r.csv: lines 2, 3, 4, 5, 6 and 3 more (8 rows): cannot render: text.hbs:2: `r.x` has no value",
                "r.csv:12: `bad` is not a valid address",
                "l/de: warning: lacks `footer`",
            ]
        );
        assert_eq!(problems.errors_of(Kind::Row), 9);
    }

    #[test]
    fn problems_fail_only_on_errors_and_list_each_with_its_place() {
        let mut problems = Problems::default();
        problems.push(Problem::warning(Path::new("a.ftl"), Some(3), "falls back"));
        assert!(problems.clone().into_result().is_ok());
        problems.push(Problem::error(
            Path::new("r.csv"),
            Some(7),
            "bad address `x`",
        ));
        let failure = problems.into_result().unwrap_err();
        assert_eq!(failure.exit, Exit::InvalidInput);
        assert!(
            failure.message.contains("r.csv:7: bad address `x`"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("falls back"));
    }
}
