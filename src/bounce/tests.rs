//! The corpus in `tests/bounces/`: messages written for mailer in the shapes real MTAs and
//! providers send, each with what it must give.

use super::*;

/// (file, kind, [(recipient, action, class, severity, status)], an original Message-ID found)
type Expected = (
    &'static str,
    Kind,
    &'static [(
        Option<&'static str>,
        Action,
        Class,
        Severity,
        Option<&'static str>,
    )],
    Option<&'static str>,
);

const CORPUS: &[Expected] = &[
    (
        "postfix-unknown-user.eml",
        Kind::Dsn,
        &[(
            Some("nobody@receiver.example"),
            Action::Failed,
            Class::InvalidRecipient,
            Severity::Hard,
            Some("5.1.1"),
        )],
        Some("0b6f3c1e9d2a4f5b8c7d6e5f4a3b2c1d@sender.example"),
    ),
    (
        "exim.eml",
        Kind::Dsn,
        &[(
            Some("gone@exim.example"),
            Action::Failed,
            Class::InvalidRecipient,
            Severity::Hard,
            Some("5.0.0"),
        )],
        Some("1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f@sender.example"),
    ),
    (
        "office365.eml",
        Kind::Dsn,
        &[(
            Some("carol@contoso.example"),
            Action::Failed,
            Class::InvalidRecipient,
            Severity::Hard,
            Some("5.1.10"),
        )],
        Some("2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a@sender.example"),
    ),
    (
        "gmail.eml",
        Kind::Dsn,
        &[(
            Some("dan@gmail.example"),
            Action::Failed,
            Class::InactiveMailbox,
            Severity::Hard,
            Some("5.2.1"),
        )],
        None,
    ),
    (
        "yahoo.eml",
        Kind::Dsn,
        &[(
            Some("erin@yahoo.example"),
            Action::Failed,
            Class::InvalidRecipient,
            Severity::Hard,
            Some("5.0.0"),
        )],
        Some("3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b@sender.example"),
    ),
    (
        "arf-abuse.eml",
        Kind::Complaint,
        &[(
            Some("frank@hotmail.example"),
            Action::Complaint,
            Class::Complaint,
            Severity::Complaint,
            None,
        )],
        Some("4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c@sender.example"),
    ),
    ("out-of-office.eml", Kind::AutoReply, &[], None),
    (
        "delayed.eml",
        Kind::Dsn,
        &[(
            Some("ivan@slow.example"),
            Action::Delayed,
            Class::BadConnection,
            Severity::Soft,
            Some("4.4.1"),
        )],
        Some("6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e@sender.example"),
    ),
    (
        // The same message given up: failed, but a 4.x.x status is never hard.
        "delayed-then-failed.eml",
        Kind::Dsn,
        &[(
            Some("ivan@slow.example"),
            Action::Failed,
            Class::BadConnection,
            Severity::Soft,
            Some("4.4.1"),
        )],
        Some("6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e@sender.example"),
    ),
    (
        "no-original-headers.eml",
        Kind::Dsn,
        &[(
            Some("judy@strict.example"),
            Action::Failed,
            Class::SpamBlock,
            Severity::Policy,
            Some("5.7.1"),
        )],
        None,
    ),
    (
        "two-recipients.eml",
        Kind::Dsn,
        &[
            (
                Some("kim@corp.example"),
                Action::Failed,
                Class::InvalidRecipient,
                Severity::Hard,
                Some("5.1.1"),
            ),
            (
                Some("lee@corp.example"),
                Action::Failed,
                Class::QuotaIssues,
                Severity::Soft,
                Some("5.2.2"),
            ),
        ],
        None,
    ),
    (
        "text-bounce.eml",
        Kind::Text,
        &[(
            None,
            Action::Failed,
            Class::InvalidRecipient,
            Severity::Hard,
            Some("5.1.1"),
        )],
        Some("7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f@sender.example"),
    ),
];

fn corpus(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/bounces")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_message_of_the_corpus_gives_its_recipients_classes_and_actions() {
    for (name, kind, notices, message_id) in CORPUS {
        let returned = parse(&corpus(name));
        assert_eq!(returned.kind, *kind, "{name}");
        let got: Vec<_> = returned
            .notices
            .iter()
            .map(|n| {
                (
                    n.recipient.as_deref(),
                    n.action,
                    n.class,
                    n.severity,
                    n.status.as_deref(),
                )
            })
            .collect();
        assert_eq!(got, notices.to_vec(), "{name}");
        assert_eq!(
            returned.message_ids.first().map(String::as_str),
            *message_id,
            "{name}"
        );
    }
}

#[test]
fn the_fields_of_a_report_are_read_unfolded_and_typed() {
    let returned = parse(&corpus("postfix-unknown-user.eml"));
    let notice = &returned.notices[0];
    assert_eq!(notice.original.as_deref(), Some("nobody@receiver.example"));
    assert_eq!(notice.remote_mta.as_deref(), Some("mx.receiver.example"));
    assert_eq!(
        notice.diagnostic.as_deref(),
        Some(
            "550 5.1.1 <nobody@receiver.example>: Recipient address rejected: User unknown in virtual mailbox table"
        )
    );
    assert!(
        returned
            .envelope
            .contains(&"bounces+6f1c2a9e0d4b7a35@sender.example".to_owned())
    );
    let text = parse(&corpus("text-bounce.eml"));
    assert!(
        text.candidates
            .contains(&"mallory@qmail.example".to_owned()),
        "{:?}",
        text.candidates
    );
    assert!(
        !text
            .candidates
            .contains(&"bounces@sender.example".to_owned()),
        "the bounce's own address"
    );
}

#[test]
fn attribution_goes_verp_then_message_id_then_final_recipient() {
    let verp = |address: &str| {
        address
            .strip_prefix("bounces+")
            .and_then(|a| a.split_once('@'))
            .map(|(t, _)| t.to_owned())
    };
    let tokens = |t: &str| (t == "6f1c2a9e0d4b7a35").then_some("row-verp");
    let ids =
        |id: &str| (id == "0b6f3c1e9d2a4f5b8c7d6e5f4a3b2c1d@sender.example").then_some("row-id");
    let named = |a: &str| match a {
        "nobody@receiver.example" => Some("row-named"),
        "kim@corp.example" => Some("row-kim"),
        "lee@corp.example" => Some("row-lee"),
        "mallory@qmail.example" => Some("row-mallory"),
        "ivan@slow.example" => Some("row-ivan"),
        _ => None,
    };
    let attributed = |name: &str,
                      tokens: &dyn Fn(&str) -> Option<&'static str>,
                      ids: &dyn Fn(&str) -> Option<&'static str>| {
        let returned = parse(&corpus(name));
        attribute(&returned, verp, tokens, ids, named)
            .into_iter()
            .map(|(r, _, m)| (r, m))
            .collect::<Vec<_>>()
    };
    let none = |_: &str| None;
    assert_eq!(
        attributed("postfix-unknown-user.eml", &tokens, &ids),
        [("row-verp", Matched::Verp)]
    );
    assert_eq!(
        attributed("postfix-unknown-user.eml", &none, &ids),
        [("row-id", Matched::MessageId)]
    );
    assert_eq!(
        attributed("postfix-unknown-user.eml", &none, &none),
        [("row-named", Matched::FinalRecipient)]
    );
    assert_eq!(
        attributed("two-recipients.eml", &none, &none),
        [
            ("row-kim", Matched::FinalRecipient),
            ("row-lee", Matched::FinalRecipient)
        ]
    );
    // Once the token says whose message it was, the other address the report names is not
    // charged: a message of mailer's has one recipient.
    let mut to_kim = b"Delivered-To: bounces+6f1c2a9e0d4b7a35@sender.example\r\n".to_vec();
    to_kim.extend(corpus("two-recipients.eml"));
    let kims = |t: &str| (t == "6f1c2a9e0d4b7a35").then_some("row-kim");
    assert_eq!(
        attribute(&parse(&to_kim), verp, kims, none, named)
            .into_iter()
            .map(|(r, _, m)| (r, m))
            .collect::<Vec<_>>(),
        [("row-kim", Matched::Verp)]
    );
    assert_eq!(
        attributed("text-bounce.eml", &none, &none),
        [("row-mallory", Matched::Text)]
    );
    assert_eq!(attributed("gmail.eml", &none, &none), []);
    assert_eq!(attributed("out-of-office.eml", &none, &none), []);
}

#[test]
fn a_report_of_successes_only_is_ignored() {
    let text = String::from_utf8(corpus("postfix-unknown-user.eml"))
        .unwrap()
        .replace("Action: failed", "Action: delivered")
        .replace("Status: 5.1.1", "Status: 2.0.0");
    let returned = parse(text.as_bytes());
    assert_eq!((returned.kind, returned.notices.len()), (Kind::Success, 0));
    assert!(returned.kind.ignored());
}

#[test]
fn hostile_input_is_bounded_and_never_fails() {
    assert_eq!(parse(b"").kind, Kind::Unrecognised);
    assert_eq!(parse(&vec![b'a'; MAX_MESSAGE + 1]).kind, Kind::Unrecognised);
    let mut many = String::from(
        "From: MAILER-DAEMON@x.example\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n",
    );
    for i in 0..1000 {
        use std::fmt::Write as _;
        let _ = write!(
            many,
            "Final-Recipient: rfc822; r{i}@x.example\nAction: failed\nStatus: 5.1.1\n\n"
        );
    }
    many.push_str("--b--\n");
    let returned = parse(many.as_bytes());
    assert_eq!(returned.notices.len(), MAX_NOTICES);
    let long = format!(
        "From: MAILER-DAEMON@x.example\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\nContent-Type: message/delivery-status\n\nFinal-Recipient: rfc822; a@x.example\nAction: failed\nDiagnostic-Code: smtp; 550 {}\n\n--b--\n",
        "x".repeat(100_000)
    );
    let returned = parse(long.as_bytes());
    let kept = returned.notices[0]
        .diagnostic
        .as_ref()
        .unwrap()
        .chars()
        .count();
    assert!((MAX_FIELD - 10..=MAX_FIELD).contains(&kept), "{kept}");
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(200))]

    /// Whatever the bytes — noise, or a corpus message with a slice replaced — parsing never
    /// fails, stays within its caps, and never calls a delay or a 4.x.x hard.
    #[test]
    fn any_message_parses_within_bounds_and_temporary_is_never_hard(
        file in 0..CORPUS.len(),
        at in 0.0..1.0f64,
        cut in 0usize..200,
        noise in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
    ) {
        let mut bytes = corpus(CORPUS[file].0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let start = (at * bytes.len() as f64) as usize;
        let end = (start + cut).min(bytes.len());
        bytes.splice(start..end, noise.iter().copied());
        for message in [&bytes[..], &noise[..]] {
            let returned = parse(message);
            proptest::prop_assert!(returned.notices.len() <= MAX_NOTICES);
            proptest::prop_assert!(returned.candidates.len() <= MAX_CANDIDATES);
            for notice in &returned.notices {
                for field in [&notice.recipient, &notice.diagnostic, &notice.remote_mta, &notice.status] {
                    proptest::prop_assert!(field.as_ref().is_none_or(|f| f.chars().count() <= MAX_FIELD));
                }
                let temporary = notice.action == Action::Delayed
                    || notice.status.as_deref().is_some_and(|s| s.starts_with('4'));
                proptest::prop_assert!(!(temporary && notice.severity == Severity::Hard), "{notice:?}");
            }
        }
    }
}
