//! The relay's EHLO reply: the extensions it lists, and what they mean for how a transaction
//! goes on the wire. lettre's `ServerInfo` keeps only 8BITMIME, SMTPUTF8, STARTTLS and AUTH,
//! so a send reads PIPELINING, CHUNKING and SIZE from an EHLO of its own (`smtp.rs`), and
//! `mailer probe` lists every extension (`probe.rs`). Pure: lines in, values out.

use serde::Serialize;

/// The most extensions kept from one EHLO reply.
const MAX_EXTENSIONS: usize = 64;
/// The most characters kept of one extension's parameters.
const MAX_PARAMETERS: usize = 256;

/// One extension an EHLO reply lists (RFC 5321 §4.1.1.1): `SIZE` and `10240000`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    /// In upper case.
    pub keyword: String,
    /// As the relay wrote them, spaces folded, capped in length.
    pub parameters: String,
}

/// How transactions go on the wire with a relay, from what its EHLO reply offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wire {
    /// Neither PIPELINING nor CHUNKING: each command waits for the reply to the one before.
    Serial,
    /// PIPELINING (RFC 2920): `MAIL`, `RCPT` and `DATA` in one write, then the body.
    Pipelined,
    /// PIPELINING and CHUNKING (RFC 3030): `MAIL`, `RCPT` and `BDAT <size> LAST` with the
    /// message in one write.
    Chunked,
}

impl Wire {
    /// This wire within what the campaign allows: without `pipelining` command by command,
    /// without `chunking` never BDAT.
    #[must_use]
    pub fn within(self, pipelining: bool, chunking: bool) -> Wire {
        match self {
            _ if !pipelining => Wire::Serial,
            Wire::Chunked if !chunking => Wire::Pipelined,
            wire => wire,
        }
    }

    /// What a send does, in a few words for `mailer probe`.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Wire::Serial => "command by command (no PIPELINING): four round trips per message",
            Wire::Pipelined => {
                "MAIL, RCPT and DATA in one write (PIPELINING), then the body: two round trips per message"
            }
            Wire::Chunked => {
                "MAIL, RCPT and BDAT with the message in one write (PIPELINING, CHUNKING): one round trip per message"
            }
        }
    }
}

/// What a send needs to know of the relay's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offers {
    pub wire: Wire,
    /// The largest message the relay takes (`SIZE`), when it says.
    pub size_limit: Option<usize>,
}

impl Offers {
    /// What `capabilities` mean for a send. CHUNKING without PIPELINING is taken as neither:
    /// its one gain, the whole transaction in one write, needs both.
    #[must_use]
    pub fn of(capabilities: &[Capability]) -> Offers {
        let has = |keyword: &str| capabilities.iter().any(|c| c.keyword == keyword);
        let wire = match (has("PIPELINING"), has("CHUNKING")) {
            (true, true) => Wire::Chunked,
            (true, false) => Wire::Pipelined,
            (false, _) => Wire::Serial,
        };
        Offers {
            wire,
            size_limit: size_limit(capabilities),
        }
    }
}

/// The limit `SIZE` gives, when it gives one (0 means none, RFC 1870).
pub fn size_limit(capabilities: &[Capability]) -> Option<usize> {
    capabilities
        .iter()
        .find(|c| c.keyword == "SIZE")
        .and_then(|c| c.parameters.parse().ok())
        .filter(|&limit| limit > 0)
}

/// The extensions of an EHLO reply, given its lines without their codes: every line after
/// the first (the relay's name) that starts with a keyword (RFC 5321 §4.1.1.1: a letter or
/// digit, then letters, digits and `-`). Other lines are skipped, a keyword listed twice is
/// kept once, and at most [`MAX_EXTENSIONS`] are kept.
#[must_use]
pub fn capabilities<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<Capability> {
    let mut found: Vec<Capability> = Vec::new();
    for line in lines.into_iter().skip(1) {
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next().filter(|k| is_keyword(k)) else {
            continue;
        };
        let keyword = keyword.to_ascii_uppercase();
        if found.iter().any(|c| c.keyword == keyword) {
            continue;
        }
        let parameters = words.collect::<Vec<_>>().join(" ");
        found.push(Capability {
            keyword,
            parameters: capped(&parameters, MAX_PARAMETERS),
        });
        if found.len() == MAX_EXTENSIONS {
            break;
        }
    }
    found
}

fn is_keyword(word: &str) -> bool {
    word.len() <= 64
        && word.starts_with(|c: char| c.is_ascii_alphanumeric())
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// At most `limit` characters of `text`, with `…` when it was cut.
pub fn capped(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reply: &[&str], expected: &[(&str, &str)]) {
        let found = capabilities(reply.iter().copied());
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|c| (c.keyword.as_str(), c.parameters.as_str()))
            .collect();
        assert_eq!(found, expected, "{reply:?}");
    }

    #[test]
    fn every_extension_of_an_ehlo_reply_is_listed_with_its_parameters() {
        // Postfix 3.7 after STARTTLS, as lettre hands the lines over (codes stripped).
        check(
            &[
                "relay.example.com",
                "PIPELINING",
                "SIZE 10240000",
                "VRFY",
                "ETRN",
                "AUTH PLAIN LOGIN",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
            ],
            &[
                ("PIPELINING", ""),
                ("SIZE", "10240000"),
                ("VRFY", ""),
                ("ETRN", ""),
                ("AUTH", "PLAIN LOGIN"),
                ("ENHANCEDSTATUSCODES", ""),
                ("8BITMIME", ""),
                ("DSN", ""),
                ("SMTPUTF8", ""),
                ("CHUNKING", ""),
            ],
        );
    }

    #[test]
    fn keywords_are_upper_cased_and_spaces_folded() {
        check(
            &[
                "mx ESMTP hi",
                "  size   52428800 ",
                "auth\tLOGIN  CRAM-MD5",
                "x-exps GSSAPI",
            ],
            &[
                ("SIZE", "52428800"),
                ("AUTH", "LOGIN CRAM-MD5"),
                ("X-EXPS", "GSSAPI"),
            ],
        );
    }

    #[test]
    fn the_first_line_and_lines_that_are_no_extension_are_skipped() {
        // The first line names the relay, even when it looks like a keyword.
        check(&["PIPELINING"], &[]);
        check(&[], &[]);
        check(
            &[
                "relay",
                "",
                "-DASH",
                "AUTH=LOGIN PLAIN",
                "\u{1b}[2J",
                "STARTTLS",
                "starttls again",
            ],
            &[("STARTTLS", "")],
        );
    }

    #[test]
    fn what_is_kept_is_capped() {
        let many: Vec<String> = (0..100).map(|i| format!("X-{i}")).collect();
        let lines: Vec<&str> = std::iter::once("relay")
            .chain(many.iter().map(String::as_str))
            .collect();
        let found = capabilities(lines);
        assert_eq!(found.len(), MAX_EXTENSIONS);
        assert_eq!(found[MAX_EXTENSIONS - 1].keyword, "X-63");
        let long = format!("relay\nX-LONG {}", "é".repeat(1000));
        let found = capabilities(long.lines());
        assert_eq!(found[0].parameters.chars().count(), MAX_PARAMETERS + 1);
        assert!(found[0].parameters.ends_with('…'));
        let keyword = "K".repeat(65);
        check(&["relay", &keyword], &[]);
    }

    #[test]
    fn the_size_limit_is_read_when_there_is_one() {
        let of = |lines: &[&str]| size_limit(&capabilities(lines.iter().copied()));
        assert_eq!(of(&["r", "SIZE 1000"]), Some(1000));
        assert_eq!(of(&["r", "SIZE 0"]), None);
        assert_eq!(of(&["r", "SIZE"]), None);
        assert_eq!(of(&["r", "SIZE lots"]), None);
        assert_eq!(of(&["r", "PIPELINING"]), None);
    }

    #[test]
    fn pipelining_and_chunking_choose_the_wire() {
        let of = |lines: &[&str]| Offers::of(&capabilities(lines.iter().copied())).wire;
        assert_eq!(of(&["r", "SIZE 1000"]), Wire::Serial);
        assert_eq!(of(&["r", "CHUNKING"]), Wire::Serial);
        assert_eq!(of(&["r", "pipelining"]), Wire::Pipelined);
        assert_eq!(of(&["r", "CHUNKING", "PIPELINING"]), Wire::Chunked);
        // The first line names the relay: it offers nothing.
        assert_eq!(of(&["PIPELINING", "SIZE 5"]), Wire::Serial);
        let offers = Offers::of(&capabilities(["r", "PIPELINING", "SIZE 5"]));
        assert_eq!(offers.size_limit, Some(5));
        // What the campaign allows.
        assert_eq!(Wire::Chunked.within(true, false), Wire::Pipelined);
        assert_eq!(Wire::Chunked.within(false, true), Wire::Serial);
        assert_eq!(Wire::Pipelined.within(true, false), Wire::Pipelined);
        assert_eq!(Wire::Pipelined.within(false, false), Wire::Serial);
        assert_eq!(Wire::Chunked.within(true, true), Wire::Chunked);
    }
}
