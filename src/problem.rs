//! Problems found in the user's input, each naming the file and line (or CSV line) it is about.
//!
//! Pure. Every loader collects its problems here instead of stopping at the first, so that
//! `check` can show them all at once and `send` can refuse with the full list.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::exit::{Exit, Failure};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Blocks sending.
    Error,
    /// Worth reading; does not block.
    Warning,
}

/// One thing wrong with one place in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub path: PathBuf,
    /// 1-based line in `path`; for the CSV, the line the record starts on.
    pub line: Option<u64>,
    pub message: String,
}

impl Problem {
    pub fn error(path: &Path, line: Option<u64>, message: impl Into<String>) -> Self {
        Problem {
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
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": {}", self.message)
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
        for problem in self.0.iter().filter(|p| p.severity == Severity::Error) {
            message.push_str("\n  ");
            message.push_str(&problem.to_string());
        }
        Failure::new(Exit::InvalidInput, message)
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
