//! The recipient list: a CSV stream → [`Recipient`] values, normalised, deduplicated, suppressed.
//!
//! [`load`] opens the files (the edge); [`parse_reader`] is pure over any `impl Read`, so tests
//! feed it byte slices. Bad rows become [`Problem`]s naming the CSV line; reading goes on so that
//! every problem is reported at once.

mod line_endings;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::address::{NormalisedAddress, normalise};

use crate::problem::{Problem, Problems};

/// The CSV header, resolved: where the columns with a meaning live.
#[derive(Debug, Clone)]
pub struct Columns {
    /// Column names as written (trimmed, BOM removed), in file order.
    pub names: Vec<String>,
    pub email: usize,
    pub name: Option<usize>,
    pub locale: Option<usize>,
}

impl Columns {
    /// The name templates see a column under (`r.<name>`): the special columns are lower-cased
    /// so that `Email` and `email` both give `r.email`.
    #[must_use]
    pub fn template_name(&self, index: usize) -> &str {
        if Some(index) == Some(self.email) {
            "email"
        } else if Some(index) == self.name {
            "name"
        } else if Some(index) == self.locale {
            "locale"
        } else {
            &self.names[index]
        }
    }
}

/// One person to write to. There is exactly one address here, and no type anywhere holds a
/// list of addresses for one message.
///
/// Compact: a campaign of a million recipients keeps them all in memory, so the row's fields
/// live in one string with their end offsets, and the address in one more.
#[derive(Debug, Clone)]
pub struct Recipient {
    /// The CSV line the row starts on (the header is line 1).
    pub line: u64,
    pub address: NormalisedAddress,
    /// Every field of the row, trimmed, one after the other.
    text: Box<str>,
    /// Where each field ends in `text`.
    ends: Box<[u32]>,
}

impl Recipient {
    /// The row's fields, in column order (trimmed).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let field = &self.text[start..end as usize];
            start = end as usize;
            field
        })
    }

    fn field(&self, index: Option<usize>) -> Option<&str> {
        let index = index?;
        let end = *self.ends.get(index)? as usize;
        let start = if index == 0 {
            0
        } else {
            self.ends[index - 1] as usize
        };
        Some(&self.text[start..end]).filter(|field| !field.is_empty())
    }

    /// The same row sent to another address (a canary message): every field stays.
    #[must_use]
    pub fn with_address(&self, address: NormalisedAddress) -> Recipient {
        Recipient {
            address,
            ..self.clone()
        }
    }

    /// The `name` column's value, if the CSV has one and it is not empty.
    #[must_use]
    pub fn name<'a>(&'a self, columns: &Columns) -> Option<&'a str> {
        self.field(columns.name)
    }

    /// The locale the row asks for, as written (resolved against the loaded locales later).
    #[must_use]
    pub fn locale<'a>(&'a self, columns: &Columns) -> Option<&'a str> {
        self.field(columns.locale)
    }
}

/// What the CSV held, after validation.
#[derive(Debug)]
pub struct RecipientList {
    pub path: PathBuf,
    pub columns: Arc<Columns>,
    /// Valid, unique, not suppressed: the people to send to, in file order.
    pub recipients: Vec<Recipient>,
    /// Rows whose address is on a suppression list (never sent).
    pub suppressed: Vec<Recipient>,
    /// Later rows repeating an earlier address: (line, line of the first occurrence).
    pub duplicates: Vec<(u64, u64)>,
    /// Rows refused for another reason whose address is valid: (address, line). Never sent,
    /// but their addresses must not leak into anyone's message either.
    pub refused: Vec<(NormalisedAddress, u64)>,
    /// Rows that cannot be sent, and anything else wrong with the file.
    pub problems: Problems,
    /// Every suppressed key (see [`suppression_key`]), as the suppression files held them when
    /// the list was loaded: the start of the live set a send keeps checking.
    pub suppression: HashSet<String>,
}

impl RecipientList {
    /// Rows rejected as invalid (each has an error in `problems`).
    #[must_use]
    pub fn invalid(&self) -> usize {
        self.problems.errors()
    }
}

/// Reads the recipient CSV at `path`, leaving out the addresses in the `suppress` files.
pub fn load(path: &Path, suppress: &[PathBuf]) -> anyhow::Result<RecipientList> {
    let (suppressed, mut problems) = read_suppressions(suppress)?;
    let reader =
        crate::files::open(path).map_err(|error| anyhow::anyhow!("the recipient list {error}"))?;
    let mut list = parse_reader(path, reader, &suppressed);
    problems.extend(std::mem::take(&mut list.problems));
    list.problems = problems;
    list.suppression = suppressed;
    Ok(list)
}

/// Reads every suppression file: the suppressed keys (see [`suppression_key`]), and the
/// entries that could not be read.
pub fn read_suppressions(files: &[PathBuf]) -> anyhow::Result<(HashSet<String>, Problems)> {
    let mut suppressed = HashSet::new();
    let mut problems = Problems::default();
    for file in files {
        let text = crate::files::read_text(file, crate::files::SUPPRESSION_CAP)
            .map_err(|error| anyhow::anyhow!("the suppression file {error}"))?;
        problems.extend(parse_suppressions(file, &text, &mut suppressed));
    }
    Ok((suppressed, problems))
}

/// The key an address is suppressed under: its normal form, lower-cased whole.
#[must_use]
pub fn suppression_key(address: &str) -> String {
    address.to_lowercase()
}

/// Watches the suppression files while a send runs: every `every`, a file whose size or
/// modification time changed is read again, and `on_change` gets what it holds now (entries
/// that cannot be read are left out and logged; a file that cannot be read changes nothing).
/// The caller adds them to what it had: nobody is un-suppressed during a run, even by a file
/// caught half-rewritten. Returns when `done` is dropped or sent to.
pub fn watch_suppressions(
    files: &[PathBuf],
    every: std::time::Duration,
    done: &std::sync::mpsc::Receiver<()>,
    mut on_change: impl FnMut(HashSet<String>),
) {
    let stamp = |file: &PathBuf| {
        std::fs::metadata(file)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut seen: Vec<_> = files.iter().map(stamp).collect();
    loop {
        match done.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now: Vec<_> = files.iter().map(stamp).collect();
        if now == seen {
            continue;
        }
        match read_suppressions(files) {
            Ok((suppressed, problems)) => {
                for problem in problems.0 {
                    tracing::warn!("suppression list changed: {problem}");
                }
                let addresses = suppressed.len();
                // Taken first, said after: whoever reads the line may rely on it.
                on_change(suppressed);
                tracing::info!(addresses, "a suppression list changed; read again");
                seen = now;
            }
            Err(error) => tracing::warn!("cannot read a suppression list again: {error:#}"),
        }
    }
}

/// Adds a suppression file's addresses to `into`: one address per line (`#` starts a comment),
/// or a CSV whose header has an `email` column. Unreadable entries are errors: a suppression
/// that silently fails to apply is how people get mail they asked not to get. Keys are
/// lower-cased whole, so a suppression matches whatever the case of the local part.
pub fn parse_suppressions(path: &Path, text: &str, into: &mut HashSet<String>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    let first = lines
        .peek()
        .map(|(_, l)| l.trim_start_matches('\u{feff}').trim().to_owned());
    let csv_column = first.as_deref().and_then(|header| {
        header.contains(',').then(|| {
            header
                .split(',')
                .position(|c| c.trim().eq_ignore_ascii_case("email"))
        })
    });
    match csv_column {
        Some(None) => problems.push(Problem::error(
            path,
            Some(1),
            "a CSV suppression file needs an `email` column",
        )),
        Some(Some(column)) => {
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .from_reader(text.as_bytes());
            for record in reader.records() {
                match record {
                    Ok(record) => {
                        let line = record.position().map(csv::Position::line);
                        let cell = record.get(column).unwrap_or("").trim();
                        suppress_one(path, line, cell, into, &mut problems);
                    }
                    Err(error) => {
                        let line = error.position().map(csv::Position::line);
                        problems.push(Problem::error(
                            path,
                            line,
                            format!("unreadable row ({error})"),
                        ));
                    }
                }
            }
        }
        None => {
            for (index, line) in lines {
                let entry = line
                    .split('#')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('\u{feff}')
                    .trim();
                suppress_one(path, Some(index as u64 + 1), entry, into, &mut problems);
            }
        }
    }
    problems
}

fn suppress_one(
    path: &Path,
    line: Option<u64>,
    entry: &str,
    into: &mut HashSet<String>,
    problems: &mut Vec<Problem>,
) {
    if entry.is_empty() {
        return;
    }
    match normalise(entry) {
        Ok(address) => {
            into.insert(suppression_key(&address.key));
        }
        Err(reason) => problems.push(Problem::error(
            path,
            line,
            format!("cannot suppress `{entry}`: {reason}"),
        )),
    }
}

/// The most bytes one CSV row may hold: the list is streamed, but one row is read whole.
pub const MAX_ROW: usize = 1 << 20;

/// Fails the read once more than [`MAX_ROW`] bytes (and the CSV reader's read-ahead) have
/// been read since `read` was last set to 0, which the parser does before each row.
struct RowCap<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<usize>>,
}

impl<R: Read> Read for RowCap<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // The csv crate reads ahead at most its buffer (8 KiB) past a row's end.
        if self.read.get() > MAX_ROW + (64 << 10) {
            return Err(std::io::Error::from(std::io::ErrorKind::FileTooLarge));
        }
        let n = self.inner.read(out)?;
        self.read.set(self.read.get() + n);
        Ok(n)
    }
}

/// Rows turned into recipients at a time, in parallel.
const BATCH: usize = 4096;

/// Parses a recipient CSV from any reader. `path` is only used to name the file in problems.
pub fn parse_reader(path: &Path, reader: impl Read, suppressed: &HashSet<String>) -> RecipientList {
    let mut problems = Problems::default();
    // Buffers the reader too, so callers can hand over a plain `File`.
    let row_bytes = std::rc::Rc::new(std::cell::Cell::new(0));
    let reader = RowCap {
        inner: line_endings::LineEndsAsLf::new(reader),
        read: std::rc::Rc::clone(&row_bytes),
    };
    let mut csv = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(reader);
    let columns = match read_columns(path, &mut csv) {
        Ok(columns) => Arc::new(columns),
        Err(problem) => {
            problems.push(problem);
            return RecipientList {
                path: path.to_path_buf(),
                columns: Arc::new(Columns {
                    names: vec![],
                    email: 0,
                    name: None,
                    locale: None,
                }),
                recipients: vec![],
                suppressed: vec![],
                suppression: HashSet::new(),
                duplicates: vec![],
                refused: vec![],
                problems,
            };
        }
    };
    let mut rows = Vec::new();
    let mut refused = Vec::new();
    // Rows are read in order and turned into recipients a batch at a time in parallel:
    // normalising addresses (IDNA) is most of the work.
    let mut batch: Vec<csv::StringRecord> = Vec::with_capacity(BATCH);
    let mut finish_batch = |batch: &mut Vec<csv::StringRecord>, problems: &mut Problems| {
        use rayon::prelude::*;
        let made: Vec<_> = batch
            .par_iter()
            .map(|record| {
                let line = record.position().map_or(0, csv::Position::line);
                (line, recipient(&columns, line, record))
            })
            .collect();
        for (line, made) in made {
            match made {
                Ok(recipient) => rows.push(recipient),
                Err((message, address)) => {
                    problems.push(Problem::row(path, line, message));
                    refused.extend(address.map(|address| (address, line)));
                }
            }
        }
        batch.clear();
    };
    loop {
        let mut record = csv::StringRecord::new();
        row_bytes.set(0);
        let starts = csv.position().line();
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => {
                let line = error.position().map_or(starts, csv::Position::line);
                let message = match error.kind() {
                    csv::ErrorKind::Utf8 { .. } => {
                        "the row is not valid UTF-8; save the file as UTF-8".to_owned()
                    }
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("the row has {len} fields but the header has {expected_len}")
                    }
                    csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::FileTooLarge => {
                        format!(
                            "the row is longer than {}, the most mailer reads of one row; reading stopped here",
                            crate::files::size(MAX_ROW as u64)
                        )
                    }
                    _ => format!("unreadable row ({error})"),
                };
                if matches!(error.kind(), csv::ErrorKind::Io(_)) {
                    // The rows after it were not read: the list itself is unusable, not one row.
                    problems.push(Problem::error(path, Some(line), message));
                    break;
                }
                problems.push(Problem::row(path, line, message));
                continue;
            }
        }
        if record.iter().all(|field| field.trim().is_empty()) {
            continue;
        }
        batch.push(record);
        if batch.len() == BATCH {
            finish_batch(&mut batch, &mut problems);
            // Rows that could not be read are reported as met, the others a batch later: file order.
            problems.0.sort_by_key(|p| p.line);
        }
    }
    finish_batch(&mut batch, &mut problems);
    // Rows that could not be read are reported as met, the others a batch later: file order.
    problems.0.sort_by_key(|p| p.line);
    let duplicates = deduplicate(&mut rows);
    // Suppression ignores case even in the local part: when in doubt, do not send.
    let suppressed_rows: Vec<Recipient> = rows
        .extract_if(.., |r| {
            suppressed.contains(&suppression_key(&r.address.key))
        })
        .collect();
    rows.shrink_to_fit();
    let recipients = rows;
    RecipientList {
        path: path.to_path_buf(),
        columns,
        recipients,
        suppressed: suppressed_rows,
        suppression: HashSet::new(),
        duplicates,
        refused,
        problems,
    }
}

/// Keeps the first row of each address, in file order, in place; later ones are removed and
/// returned as (line, line of the first). Sorting indices by address is exact and needs 4 bytes a row,
/// where a hash set of the addresses would copy them all.
fn deduplicate(rows: &mut Vec<Recipient>) -> Vec<(u64, u64)> {
    use rayon::slice::ParallelSliceMut as _;
    let mut order: Vec<u32> = (0..u32::try_from(rows.len()).unwrap_or(u32::MAX)).collect();
    // Stable on equal addresses, so the first row of each comes first.
    order.par_sort_by(|&a, &b| {
        rows[a as usize]
            .address
            .key
            .cmp(&rows[b as usize].address.key)
    });
    let mut keep = vec![true; rows.len()];
    let mut duplicates = Vec::new();
    let mut run_start = None::<usize>;
    for &index in &order {
        let index = index as usize;
        match run_start {
            Some(first) if rows[first].address.key == rows[index].address.key => {
                keep[index] = false;
                duplicates.push((rows[index].line, rows[first].line));
            }
            _ => run_start = Some(index),
        }
    }
    duplicates.sort_unstable();
    let mut index = 0;
    rows.retain(|_| {
        index += 1;
        keep[index - 1]
    });
    duplicates
}

fn read_columns<R: Read>(path: &Path, csv: &mut csv::Reader<R>) -> Result<Columns, Problem> {
    let header = csv.headers().map_err(|error| {
        Problem::error(
            path,
            Some(1),
            format!("the header row cannot be read ({error})"),
        )
    })?;
    let names: Vec<String> = header
        .iter()
        .map(|name| name.trim_start_matches('\u{feff}').trim().to_owned())
        .collect();
    let find = |wanted: &str| names.iter().position(|n| n.eq_ignore_ascii_case(wanted));
    let Some(email) = find("email") else {
        return Err(Problem::error(
            path,
            Some(1),
            "the header row has no `email` column",
        ));
    };
    let mut seen = HashSet::new();
    for name in &names {
        if name.is_empty() {
            return Err(Problem::error(
                path,
                Some(1),
                "the header row has an empty column name",
            ));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Problem::error(
                path,
                Some(1),
                format!("the header row names the column `{name}` twice"),
            ));
        }
    }
    Ok(Columns {
        email,
        name: find("name"),
        locale: find("locale"),
        names,
    })
}

/// A row → a recipient, or why not, with the row's address when that part was fine.
fn recipient(
    columns: &Columns,
    line: u64,
    record: &csv::StringRecord,
) -> Result<Recipient, (String, Option<NormalisedAddress>)> {
    let raw_email = record.get(columns.email).unwrap_or("").trim();
    if raw_email.is_empty() {
        return Err(("the `email` field is empty".to_owned(), None));
    }
    let address = normalise(raw_email).map_err(|reason| {
        (
            format!("`{raw_email}` is not a valid address: {reason}"),
            None,
        )
    })?;
    let mut text = String::with_capacity(record.as_slice().len());
    let mut ends = Vec::with_capacity(record.len());
    for field in record {
        text.push_str(field.trim());
        match u32::try_from(text.len()) {
            Ok(end) => ends.push(end),
            Err(_) => return Err(("the row is too long".to_owned(), Some(address))),
        }
    }
    let recipient = Recipient {
        line,
        address,
        text: text.into(),
        ends: ends.into(),
    };
    // The name reaches the To header: a line break there would let the data write headers.
    if recipient
        .name(columns)
        .is_some_and(|name| name.contains(['\r', '\n']))
    {
        let message =
            "the `name` field contains a line break, which would reach the To header".to_owned();
        return Err((message, Some(recipient.address)));
    }
    Ok(recipient)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(csv: &str) -> RecipientList {
        parse_reader(Path::new("r.csv"), csv.as_bytes(), &HashSet::new())
    }

    fn messages(list: &RecipientList) -> Vec<String> {
        list.problems
            .0
            .iter()
            .map(|p| format!("{}: {}", p.line.unwrap_or(0), p.message))
            .collect()
    }

    #[test]
    fn header_bom_and_whitespace_are_tolerated_and_columns_kept() {
        let list = check("\u{feff} Email , Name ,plan\nann@example.com,Ann,gold\n");
        assert_eq!(messages(&list), Vec::<String>::new());
        assert_eq!(list.recipients.len(), 1);
        let r = &list.recipients[0];
        assert_eq!(
            (r.line, &*r.address.key, r.name(&list.columns)),
            (2, "ann@example.com", Some("Ann"))
        );
        assert_eq!(
            r.fields().collect::<Vec<_>>(),
            ["ann@example.com", "Ann", "gold"]
        );
        assert_eq!(r.locale(&list.columns), None);
        assert_eq!(list.columns.template_name(0), "email");
        assert_eq!(list.columns.template_name(2), "plan");
    }

    #[test]
    fn bad_rows_are_reported_with_their_line_and_reading_goes_on() {
        let list = check(
            "email,name\nnot-an-address,A\nb@example.com\n\"c@example.com\",\"C\r\nInjected: 1\"\nd@localhost,D\ne@example.com,E\n",
        );
        let found = messages(&list);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(
            found[0].starts_with("2: `not-an-address` is not a valid address"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("3: the row has 1 fields but the header has 2"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("4: the `name` field contains a line break"),
            "{found:?}"
        );
        assert!(
            found[3].starts_with("6: `d@localhost` is not a valid address"),
            "{found:?}"
        );
        assert_eq!(list.recipients.len(), 1);
        assert_eq!(list.recipients[0].line, 7);
    }

    #[test]
    fn windows_unix_and_classic_mac_line_ends_give_the_same_line_numbers() {
        for end in ["\r\n", "\n", "\r"] {
            let csv = [
                "email",
                "ann@example.com",
                "not an address",
                "\"bob@example.com\"",
                "",
            ]
            .join(end);
            let list = check(&csv);
            assert_eq!(
                list.recipients.iter().map(|r| r.line).collect::<Vec<_>>(),
                [2, 4],
                "{end:?}"
            );
            assert_eq!(
                messages(&list),
                ["3: `not an address` is not a valid address: Missing domain or user"],
                "{end:?}"
            );
        }
    }

    #[test]
    fn duplicates_differ_only_in_domain_case_and_are_sent_once() {
        let list = check("email\nAnn@Example.COM\nAnn@example.com\nann@example.com\n");
        assert_eq!(list.recipients.len(), 2, "local parts are case-sensitive");
        assert_eq!(list.duplicates, vec![(3, 2)]);
    }

    #[test]
    fn missing_email_column_and_invalid_utf8_are_errors() {
        assert_eq!(
            messages(&check("name\nAnn\n")),
            vec!["1: the header row has no `email` column"]
        );
        let list = parse_reader(
            Path::new("r.csv"),
            &b"email,name\na@example.com,\xff\xfe\n"[..],
            &HashSet::new(),
        );
        assert_eq!(
            messages(&list),
            vec!["2: the row is not valid UTF-8; save the file as UTF-8"]
        );
    }

    #[test]
    fn suppressed_addresses_are_kept_apart() {
        let mut set = HashSet::new();
        let problems = parse_suppressions(
            Path::new("s.txt"),
            "# opted out\nBob@EXAMPLE.com\n\nnot an address\n",
            &mut set,
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(4));
        let list = parse_reader(
            Path::new("r.csv"),
            "email\nbob@example.com\nann@example.com\n".as_bytes(),
            &set,
        );
        assert_eq!(list.suppressed.len(), 1);
        assert_eq!(list.recipients.len(), 1);
    }

    #[test]
    fn suppression_csv_uses_its_email_column() {
        let mut set = HashSet::new();
        let problems = parse_suppressions(
            Path::new("s.csv"),
            "reason,email\nbounce,x@example.org\n",
            &mut set,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(set.contains("x@example.org"));
    }
}
