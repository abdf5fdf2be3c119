//! How log lines are written, in both formats, with every value's control characters escaped
//! (see [`crate::printable`]): a server's reply or an address in a log line cannot write to
//! the terminal or the log file that shows it. Pure, but for [`QuietStderr`].
//!
//! tracing-subscriber 0.3.23 escapes a few characters (ESC, BEL, BS, FF, DEL, C1) in the
//! message of a text line only: not CR, LF, NUL or the bidi controls, and not the other
//! fields (`reply = %text`). Its JSON lines escape C0 as JSON does and pass C1 and the bidi
//! controls as they are. So both formats take their fields from here instead: [`text_fields`]
//! for text lines (the line's level, colours and layout stay tracing-subscriber's), and
//! [`JsonLines`] for whole JSON lines, shaped as tracing-subscriber's
//! (`{"timestamp", "level", "fields": {"message", …}, "target"}`).

use std::fmt;
use std::io::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::registry::LookupSpan;

use super::progress::BarSafeStderr;
use crate::printable::{Shown, escape};

/// The fields of a text line: `message key=value …`, each value escaped.
#[must_use]
pub fn text_fields() -> impl for<'w> FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt as _;
    format::debug_fn(
        |writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
            let shown = Shown(format_args!("{value:?}"));
            if field.name() == "message" {
                write!(writer, "{shown}")
            } else {
                write!(writer, "{}={shown}", field.name())
            }
        },
    )
    .delimited(" ")
}

/// JSON log lines (`--log-format json`), one object a line, every string field escaped.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let line = serde_json::json!({
            "timestamp": timestamp,
            "level": meta.level().as_str(),
            "fields": fields.0,
            "target": meta.target(),
        });
        writeln!(writer, "{line}")
    }
}

/// An event's fields as JSON values: numbers and booleans as they are, everything else as an
/// escaped string.
#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl JsonFields {
    fn insert(&mut self, field: &Field, value: impl Into<serde_json::Value>) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, escape(value).into_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Shown(format_args!("{value:?}")).to_string());
    }
}

/// Standard error for log lines, which never fails: a log line that cannot be written (standard
/// error closed, a full disk behind a redirect) is dropped, and the run goes on. A send must
/// not stop delivering, or lose its journal's state, because nobody reads its log.
#[derive(Default)]
pub struct QuietStderr(BarSafeStderr);

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const REPLY: &str = "550 \x1b[2J\x1b[31mFAKE\x1b]0;title\x07 \u{9b}1m \u{202e}txt.exe\r\nx";
    const SHOWN: &str =
        "550 \\x1b[2J\\x1b[31mFAKE\\x1b]0;title\\x07 \\u{9b}1m \\u{202e}txt.exe\\r\\nx";

    fn log(json: bool) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        let subscriber: Box<dyn Subscriber + Send + Sync> = if json {
            Box::new(builder.event_format(JsonLines).finish())
        } else {
            Box::new(builder.fmt_fields(text_fields()).without_time().finish())
        };
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(reply = %REPLY, domain = "x\u{85}y", attempt = 2, "refused: {REPLY}");
        });
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn assert_clean(line: &str) {
        assert!(
            !line
                .trim_end_matches('\n')
                .chars()
                .any(crate::printable::is_control),
            "{line:?}"
        );
    }

    #[test]
    fn text_lines_escape_every_field() {
        let line = log(false);
        assert_clean(&line);
        assert!(line.contains(&format!("refused: {SHOWN}")), "{line}");
        assert!(line.contains(&format!("reply={SHOWN}")), "{line}");
        assert!(line.contains("domain=\"x\\u{85}y\" attempt=2"), "{line}");
    }

    #[test]
    fn json_lines_escape_every_string_field() {
        let line = log(true);
        assert_clean(&line);
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(entry["level"], "WARN");
        assert_eq!(entry["fields"]["message"], format!("refused: {SHOWN}"));
        assert_eq!(entry["fields"]["reply"], SHOWN);
        assert_eq!(entry["fields"]["domain"], "x\\u{85}y");
        assert_eq!(entry["fields"]["attempt"], 2);
        assert!(
            entry["timestamp"].as_str().is_some_and(|t| t.len() > 19),
            "{line}"
        );
        assert!(entry["target"].as_str().is_some(), "{line}");
    }
}
