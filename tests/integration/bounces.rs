//! `mailer bounces`: returned mail attributed, classified, recorded once, never deleted; the
//! return path per recipient on the wire; a refusal at send time classified the same way; and
//! end to end through a real Postfix that returns its own DSNs.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::campaign::{Campaign, Run, mailer};
use crate::sink::{Phase, Script, Sink};

const KEY_ENV: &str = "MAILER_TEST_BOUNCE_KEY";
const KEY: &str = "bounce-test-key-0123456789";

fn with_bounces(campaign: Campaign, return_path: &str) -> Campaign {
    campaign.extra(&format!(
        "\n[bounces]\nreturn_path = \"{return_path}\"\nsecret_env = \"{KEY_ENV}\"\n"
    ))
}

fn run(args: &[&str]) -> Run {
    mailer(args, &[(KEY_ENV, KEY)])
}

/// `mailer report --format json` of the campaign: one object per row.
fn report(path: &Path) -> Vec<serde_json::Value> {
    let report = run(&["report", path.to_str().unwrap(), "--format", "json"]);
    assert_eq!(report.code, 0, "{report:?}");
    serde_json::from_str(&report.stdout).unwrap()
}

fn row<'a>(rows: &'a [serde_json::Value], address: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["address"] == address)
        .unwrap_or_else(|| panic!("no row for {address}"))
}

fn status(path: &Path) -> serde_json::Value {
    let status = run(&["status", path.to_str().unwrap(), "--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    serde_json::from_str(&status.stdout).unwrap()
}

/// Every file of a folder tree with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A DSN for `recipient`'s message `message_id`, delivered to `to`.
fn dsn(to: &str, recipient: &str, message_id: &str, status: &str, text: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.example.net\r\nTo: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nIt could not be delivered.\r\n\r\n\
         --b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n\
         Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {text}\r\n\r\n\
         --b\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@example.com\r\nTo: {recipient}\r\nMessage-ID: <{message_id}>\r\n\r\n--b--\r\n"
    )
}

fn maildir(dir: &Path, messages: &[(&str, String)]) {
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for (name, text) in messages {
        std::fs::write(dir.join("new").join(name), text).unwrap();
    }
}

#[test]
fn returned_mail_is_recorded_once_never_deleted_and_the_unattributed_listed() {
    let campaign = Campaign::example()
        .row("ann@example.com,Ann,en,gold")
        .row("bob@example.org,Bob,en,gold")
        .row("cat@example.net,Cat,en,gold")
        .row("dan@example.net,Dan,en,gold");
    let path = campaign.write();
    let sent = run(&["send", path.to_str().unwrap()]);
    assert_eq!(sent.code, 0, "{sent:?}");
    let rows = report(&path);
    let id = |address: &str| {
        row(&rows, address)["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The relay rewrote MAIL FROM (no VERP here): the original Message-ID decides for Ann, the
    // Final-Recipient for Bob (no headers of the original), the complaint names Cat.
    let bob = dsn(
        "news@example.com",
        "bob@example.org",
        "unknown@elsewhere",
        "5.2.2",
        "552 5.2.2 Mailbox full",
    )
    .replace("Message-ID: <unknown@elsewhere>\r\n", "");
    let complaint = format!(
        "From: abuse@isp.example\r\nTo: news@example.com\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"f\"\r\n\r\n\
         --f\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n\r\n\
         --f\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nVersion: 1\r\nOriginal-Rcpt-To: <cat@example.net>\r\n\r\n\
         --f\r\nContent-Type: message/rfc822\r\n\r\nFrom: news@example.com\r\nTo: cat@example.net\r\nMessage-ID: <{}>\r\n\r\nhi\r\n--f--\r\n",
        id("cat@example.net")
    );
    let dir = campaign.dir().join("returned");
    maildir(
        &dir,
        &[
            ("1.ann", dsn("news@example.com", "ann-forwarded@other.example", &id("ann@example.com"), "5.1.1", "550 5.1.1 User unknown")),
            ("2.bob", bob),
            ("3.cat", complaint),
            ("4.away", "From: dan@example.net\r\nTo: news@example.com\r\nSubject: Out of Office: news\r\nAuto-Submitted: auto-replied\r\n\r\nAway.\r\n".to_owned()),
            ("5.stranger", dsn("news@example.com", "zed@nowhere.example", "zzz@nowhere.example", "5.1.1", "550 5.1.1 User unknown")),
            ("6.junk", "From: \u{1b}[31mspam@x.example\r\nSubject: hello\u{7}\r\n\r\nbuy\r\n".to_owned()),
            // Dan is on this list too, but the message was another campaign's.
            ("7.other", dsn("news@example.com", "dan@example.net", "0123abcd@example.com", "5.1.1", "550 5.1.1 User unknown")),
        ],
    );
    let before = snapshot(&dir);
    let suppress = campaign.dir().join("bounced.txt");
    let first = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        dir.to_str().unwrap(),
        "--suppress",
        suppress.to_str().unwrap(),
    ]);
    assert_eq!(first.code, 0, "{first:?}");
    let out = &first.stdout;
    assert!(out.contains("new/1.ann ann@example.com: failed InvalidRecipient (hard, 5.1.1) by message-id, bounced"), "{out}");
    assert!(out.contains("new/2.bob bob@example.org: failed QuotaIssues (soft, 5.2.2) by final-recipient, bounced"), "{out}");
    assert!(
        out.contains(
            "new/3.cat cat@example.net: complaint Complaint (complaint) by message-id, complained"
        ),
        "{out}"
    );
    assert!(out.contains("ignored new/4.away: auto-reply"), "{out}");
    assert!(
        out.contains("unattributed new/5.stranger: dsn from MAILER-DAEMON@mx.example.net"),
        "{out}"
    );
    assert!(out.contains("naming zed@nowhere.example"), "{out}");
    assert!(
        out.contains("unattributed new/6.junk: unrecognised"),
        "{out}"
    );
    assert!(
        out.contains("unattributed new/7.other: dsn from MAILER-DAEMON@mx.example.net \"Undelivered Mail Returned to Sender\": its original Message-ID is on the sender's domain but not in this campaign's journal"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{7}'),
        "escaped: {out}"
    );
    assert!(out.contains("7 messages read: 3 attributed (3 notices, 3 recipients now bounced or complained), 1 ignored"), "{out}");
    assert!(out.contains("3 unattributed, 0 recorded before"), "{out}");
    assert_eq!(snapshot(&dir), before, "nothing changed or deleted");
    // Hard bounces and complaints only: not Bob's full mailbox.
    let suppressed = std::fs::read_to_string(&suppress).unwrap();
    let listed: Vec<&str> = suppressed.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(listed, ["ann@example.com", "cat@example.net"]);

    let counts = |status: &serde_json::Value| {
        ["sent", "bounced", "complained"].map(|s| status["counts"][s].as_u64().unwrap())
    };
    let after_first = status(&path);
    assert_eq!(counts(&after_first), [1, 2, 1]);
    assert_eq!(after_first["total"], 4, "the counts add up");
    let classes: Vec<&str> = after_first["bounce_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(classes, ["Complaint", "InvalidRecipient", "QuotaIssues"]);
    let text = run(&["status", path.to_str().unwrap()]);
    assert!(
        text.stdout
            .contains("top bounce classes: Complaint (complaint) ×1, InvalidRecipient (hard) ×1"),
        "{}",
        text.stdout
    );
    let rows = report(&path);
    assert_eq!(
        row(&rows, "ann@example.com")["bounce_class"],
        "InvalidRecipient"
    );
    assert_eq!(row(&rows, "bob@example.org")["bounce_severity"], "soft");
    assert_eq!(
        row(&rows, "dan@example.net")["bounce_class"],
        serde_json::Value::Null
    );
    let csv = run(&["report", path.to_str().unwrap()]);
    assert!(
        csv.stdout
            .lines()
            .next()
            .unwrap()
            .ends_with(",bounce_class,bounce_severity,bounce_status,bounce_diagnostic,bounced_at")
    );

    // A later send of the campaign sends none of them again: they are settled.
    let resend = run(&["send", path.to_str().unwrap()]);
    assert_eq!(resend.code, 0, "{resend:?}");
    assert!(
        resend.stdout.contains("bounced") && resend.stdout.contains("complained"),
        "{}",
        resend.stdout
    );
    assert!(resend.stdout.contains("nothing due"), "{}", resend.stdout);
    // Twice: nothing changes, the unattributed are listed again.
    let second = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        dir.to_str().unwrap(),
        "--suppress",
        suppress.to_str().unwrap(),
    ]);
    assert_eq!(second.code, 0, "{second:?}");
    assert!(second.stdout.contains("7 messages read: 0 attributed (0 notices, 0 recipients now bounced or complained), 0 ignored"), "{}", second.stdout);
    assert!(
        second.stdout.contains("3 unattributed, 4 recorded before"),
        "{}",
        second.stdout
    );
    assert!(
        second.stdout.contains("unattributed new/5.stranger"),
        "{}",
        second.stdout
    );
    assert!(
        second.stdout.contains("0 addresses added"),
        "{}",
        second.stdout
    );
    assert_eq!(std::fs::read_to_string(&suppress).unwrap(), suppressed);
    assert_eq!(report(&path), rows, "the journal is as it was");
    assert_eq!(snapshot(&dir), before);

    // The same DSN from standard input or an mbox is the same message: recorded before.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_mailer"))
        .args(["bounces", path.to_str().unwrap(), "-"])
        .env(KEY_ENV, KEY)
        .stdin(std::fs::File::open(dir.join("new/1.ann")).unwrap())
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.contains("1 messages read: 0 attributed") && again.contains("1 recorded before"),
        "{again}"
    );

    // `--move-to` moves what was recorded and leaves the unattributed.
    let done = campaign.dir().join("done");
    std::fs::create_dir(&done).unwrap();
    let moved = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        dir.to_str().unwrap(),
        "--move-to",
        done.to_str().unwrap(),
    ]);
    assert_eq!(moved.code, 0, "{moved:?}");
    let mut left: Vec<String> = std::fs::read_dir(dir.join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["5.stranger", "6.junk", "7.other"]);
    assert_eq!(std::fs::read_dir(&done).unwrap().count(), 4);
}

#[test]
fn an_mbox_is_read_message_by_message() {
    let campaign = Campaign::example()
        .row("ann@example.com,Ann,en,gold")
        .row("bob@example.org,Bob,en,gold");
    let path = campaign.write();
    assert_eq!(run(&["send", path.to_str().unwrap()]).code, 0);
    let mbox = campaign.dir().join("bounces.mbox");
    let mut text = String::new();
    for (recipient, status) in [("ann@example.com", "5.1.1"), ("bob@example.org", "4.4.1")] {
        text.push_str("From MAILER-DAEMON Tue Dec  1 10:00:00 2026\n");
        text.push_str(
            &dsn("news@example.com", recipient, "none@x", status, "no")
                .replace("\r\n", "\n")
                .replace(
                    "Action: failed",
                    if status.starts_with('4') {
                        "Action: delayed"
                    } else {
                        "Action: failed"
                    },
                ),
        );
        text.push('\n');
    }
    std::fs::write(&mbox, &text).unwrap();
    let read = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--mbox",
        mbox.to_str().unwrap(),
    ]);
    assert_eq!(read.code, 0, "{read:?}");
    assert!(read.stdout.contains("bounces.mbox#1 ann@example.com: failed InvalidRecipient (hard, 5.1.1) by final-recipient, bounced"), "{}", read.stdout);
    // A delay is recorded, and settles nothing.
    assert!(read.stdout.contains("bounces.mbox#2 bob@example.org: delayed BadConnection (soft, 4.4.1) by final-recipient, state unchanged"), "{}", read.stdout);
    assert_eq!(std::fs::read_to_string(&mbox).unwrap(), text);
    let counts = &status(&path)["counts"];
    assert_eq!(
        (counts["bounced"].as_u64(), counts["sent"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn the_return_path_carries_an_opaque_token_per_recipient_and_a_refusal_is_classified_at_send_time()
{
    let refuse: Script = Arc::new(|phase, rcpt| match (phase, rcpt) {
        (Phase::Rcpt, "gone@example.org") => Some(
            "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown".to_owned(),
        ),
        (Phase::EndOfData, "full@example.org") => Some("552 5.2.2 Mailbox full".to_owned()),
        _ => None,
    });
    let sink = Sink::scripted(refuse);
    let campaign = with_bounces(
        Campaign::example()
            .smtp(&sink, 1)
            .row("ann@example.com,Ann,en,gold")
            .row("bob@example.org,Bob,en,gold")
            .row("gone@example.org,Gone,en,gold")
            .row("full@example.org,Full,en,gold"),
        "bounces@example.com",
    );
    let path = campaign.write();
    let missing = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(missing.code, 65, "no key, no send: {missing:?}");
    assert!(missing.stderr.contains(KEY_ENV), "{}", missing.stderr);
    assert!(sink.transactions().is_empty());
    let sent = run(&["send", path.to_str().unwrap()]);
    assert_eq!(sent.code, 1, "two 5xx: {sent:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 3, "full@ got to the end of DATA");
    let mut froms = Vec::new();
    for t in &transactions {
        let (local, domain) = t.mail_from.split_once('@').unwrap();
        let token = local.strip_prefix("bounces+").unwrap();
        assert_eq!(domain, "example.com");
        assert_eq!(token.len(), 16);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        assert!(
            !t.mail_from
                .contains(t.rcpt_to[0].split('@').next().unwrap()),
            "never the address: {}",
            t.mail_from
        );
        let message = crate::parse(&t.data);
        assert_eq!(
            message.from().unwrap().first().unwrap().address(),
            Some("news@example.com"),
            "From unchanged"
        );
        assert!(
            message.return_path().as_text().is_none(),
            "no Return-Path header from us"
        );
        froms.push(t.mail_from.clone());
    }
    assert_ne!(froms[0], froms[1], "one token per recipient");
    let rows = report(&path);
    let gone = row(&rows, "gone@example.org");
    assert_eq!(
        (
            gone["state"].as_str(),
            gone["bounce_class"].as_str(),
            gone["bounce_severity"].as_str()
        ),
        (Some("failed"), Some("InvalidRecipient"), Some("hard"))
    );
    let full = row(&rows, "full@example.org");
    assert_eq!(
        (
            full["state"].as_str(),
            full["bounce_class"].as_str(),
            full["bounce_severity"].as_str(),
            full["bounce_status"].as_str()
        ),
        (
            Some("failed"),
            Some("QuotaIssues"),
            Some("soft"),
            Some("5.2.2")
        ),
        "refused after the dot"
    );
    let classes: Vec<String> = status(&path)["bounce_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(classes, ["InvalidRecipient", "QuotaIssues"]);
    // Refused at RCPT: a hard bounce for the suppression file too; the full mailbox is not.
    let suppress = campaign.dir().join("out.txt");
    let empty = campaign.dir().join("empty");
    maildir(&empty, &[]);
    let out = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        empty.to_str().unwrap(),
        "--suppress",
        suppress.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let written = std::fs::read_to_string(&suppress).unwrap();
    let listed: Vec<&str> = written.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(listed, ["gone@example.org"]);
    // A DSN to Bob's return path is Bob's, whatever it names.
    let bob_path = transactions
        .iter()
        .find(|t| t.rcpt_to[0] == "bob@example.org")
        .unwrap()
        .mail_from
        .clone();
    let returned = campaign.dir().join("returned");
    maildir(
        &returned,
        &[(
            "1",
            dsn(
                &bob_path,
                "robert@forwarded.example",
                "x@y",
                "5.1.1",
                "550 5.1.1 unknown",
            ),
        )],
    );
    let read = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        returned.to_str().unwrap(),
    ]);
    assert!(
        read.stdout.contains(
            "new/1 bob@example.org: failed InvalidRecipient (hard, 5.1.1) by verp, bounced"
        ),
        "{}",
        read.stdout
    );
    // A token of ours that is no recipient's here: another campaign's, whoever it names.
    let foreign = campaign.dir().join("foreign");
    maildir(
        &foreign,
        &[(
            "1",
            dsn(
                "bounces+0000000000000000@example.com",
                "ann@example.com",
                "x@y",
                "5.1.1",
                "550 5.1.1 unknown",
            ),
        )],
    );
    let read = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        foreign.to_str().unwrap(),
    ]);
    assert!(
        read.stdout.contains("unattributed new/1: dsn")
            && read
                .stdout
                .contains("token is no recipient's of this campaign"),
        "{}",
        read.stdout
    );
    // The probe's MAIL FROM has the same shape.
    let probe = run(&["probe", path.to_str().unwrap(), "--to", "ann@example.com"]);
    assert_eq!(probe.code, 0, "{probe:?}");
    let ann_path = &transactions
        .iter()
        .find(|t| t.rcpt_to[0] == "ann@example.com")
        .unwrap()
        .mail_from;
    assert!(
        probe.stdout.contains(ann_path.as_str()),
        "{ann_path}: {}",
        probe.stdout
    );
}

/// A Postfix of its own: a private configuration, queue and mail folder in a temporary
/// directory, SMTP on a free loopback port. `receiver.test` knows only `ann`, and bounces the
/// rest after accepting them (so it sends DSNs); `bounces.test` delivers `bounces+anything` into
/// one Maildir. Stopped when dropped, whatever the test did.
struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
}

impl Postfix {
    const POSTFIX: &str = "/usr/sbin/postfix";
    /// The virtual delivery agent's user (nobody): it may not be root.
    const MAIL_UID: u32 = 65534;

    fn start() -> Postfix {
        assert!(
            Path::new(Self::POSTFIX).exists(),
            "the Postfix test needs Debian's postfix package: run scripts/test (as root), which installs it"
        );
        let dir = tempfile::Builder::new()
            .prefix("mailer-postfix-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for sub in ["conf", "queue", "data", "mail/ann", "mail/bounces"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let chown = |path: &Path, owner: &str| {
            let status = std::process::Command::new("chown")
                .args(["-R", owner, path.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown {owner} {}", path.display());
        };
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(&root.join("data"), "postfix");
        chown(&root.join("mail"), &format!("{0}:{0}", Self::MAIL_UID));
        let r = root.display();
        let main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {r}/queue\ndata_directory = {r}/data\nmeta_directory = /etc/postfix\n\
             command_directory = /usr/sbin\ndaemon_directory = /usr/lib/postfix/sbin\nshlib_directory = /usr/lib/postfix\n\
             mail_owner = postfix\nsetgid_group = postdrop\n\
             maillog_file = {r}/maillog\nmaillog_file_prefixes = {r}\n\
             inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             myhostname = mx.receiver.test\nmydomain = receiver.test\nmyorigin = receiver.test\n\
             mydestination =\nrelay_domains =\nmynetworks = 127.0.0.0/8\n\
             smtp_dns_support_level = disabled\nsmtputf8_enable = no\nbiff = no\nappend_dot_mydomain = no\n\
             # Accept unknown users, then bounce them: Postfix writes the DSNs itself.\n\
             smtpd_reject_unlisted_recipient = no\n\
             virtual_mailbox_domains = receiver.test, bounces.test\n\
             virtual_mailbox_base = {r}/mail\n\
             virtual_mailbox_maps = inline:{{ {{ann@receiver.test=ann/}}, {{bounces@bounces.test=bounces/}} }}\n\
             virtual_uid_maps = static:{uid}\nvirtual_gid_maps = static:{uid}\nvirtual_minimum_uid = 100\n\
             recipient_delimiter = +\n",
            uid = Self::MAIL_UID
        );
        std::fs::write(root.join("conf/main.cf"), main).unwrap();
        // Debian's services, with smtpd on the test's own port instead of 25, unchrooted.
        let services = std::fs::read_to_string("/etc/postfix/master.cf").unwrap();
        let master: String = services
            .lines()
            .map(|line| {
                if line.starts_with("smtp ") && line.contains(" inet ") {
                    format!("127.0.0.1:{port} inet n - n - - smtpd\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(root.join("conf/master.cf"), master).unwrap();
        let postfix = Postfix { dir, port };
        let started = postfix.command("start");
        assert!(
            started.status.success(),
            "postfix start: {}\n{}",
            String::from_utf8_lossy(&started.stderr),
            postfix.log()
        );
        crate::campaign::wait_until("postfix listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        postfix
    }

    fn command(&self, what: &str) -> std::process::Output {
        std::process::Command::new(Self::POSTFIX)
            .args(["-c", self.dir.path().join("conf").to_str().unwrap(), what])
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user)
    }

    fn delivered(&self, user: &str) -> usize {
        std::fs::read_dir(self.maildir(user).join("new")).map_or(0, Iterator::count)
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        // The master's pid, before `stop` (which returns once the master is told).
        let pid = std::fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        let _ = self.command("stop");
        let start = std::time::Instant::now();
        while let Some(pid) = pid
            && Path::new(&format!("/proc/{pid}")).exists()
            && start.elapsed() < std::time::Duration::from_secs(20)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn a_real_postfix_returns_its_dsns_to_the_return_path_and_the_next_campaign_skips_them() {
    let postfix = Postfix::start();
    let gone = [
        "nobody@receiver.test",
        "left@receiver.test",
        "never@receiver.test",
    ];
    let mut campaign = Campaign::example()
        .transport_kind(&format!(
            "kind = \"smtp\"\nurl = \"smtp://127.0.0.1:{}\"\nconnections = 1\n",
            postfix.port
        ))
        .row("ann@receiver.test,Ann,en,gold");
    for address in gone {
        campaign = campaign.row(&format!("{address},Gone,en,gold"));
    }
    let campaign = with_bounces(campaign, "bounces@bounces.test");
    let path = campaign.write();
    let sent = run(&["send", path.to_str().unwrap()]);
    assert_eq!(
        sent.code,
        0,
        "Postfix takes all four, then bounces three: {sent:?}\n{}",
        postfix.log()
    );
    crate::campaign::wait_until("Postfix's three DSNs and Ann's message", || {
        postfix.delivered("bounces") == 3 && postfix.delivered("ann") == 1
    });
    // Postfix offers PIPELINING and CHUNKING: all four went with BDAT, none with DATA, on one
    // connection (smtpd counts each command when the client disconnects).
    let log = postfix.log();
    assert!(
        log.lines()
            .any(|l| l.contains(" disconnect from ") && l.contains(" mail=4 rcpt=4 bdat=4 ")),
        "{log}"
    );
    assert!(!log.contains(" data="), "{log}");
    let returned = postfix.maildir("bounces");
    let before = snapshot(&returned);
    let suppress = campaign.dir().join("bounced.txt");
    let read = run(&[
        "bounces",
        path.to_str().unwrap(),
        "--maildir",
        returned.to_str().unwrap(),
        "--suppress",
        suppress.to_str().unwrap(),
    ]);
    assert_eq!(read.code, 0, "{read:?}");
    for address in gone {
        assert!(
            read.stdout.lines().any(|l| l.contains(&format!(
                " {address}: failed InvalidRecipient (hard, 5.1.1) by verp, bounced"
            ))),
            "{address}: {}",
            read.stdout
        );
    }
    assert!(
        read.stdout.contains("3 messages read: 3 attributed"),
        "{}",
        read.stdout
    );
    assert!(read.stdout.contains("0 unattributed"), "{}", read.stdout);
    assert_eq!(snapshot(&returned), before, "the Maildir is left as it was");
    let rows = report(&path);
    for address in gone {
        let row = row(&rows, address);
        assert_eq!(
            (row["state"].as_str(), row["bounce_class"].as_str()),
            (Some("bounced"), Some("InvalidRecipient")),
            "{address}"
        );
        assert!(
            row["bounce_diagnostic"]
                .as_str()
                .unwrap()
                .contains("unknown user"),
            "{row}"
        );
    }
    assert_eq!(row(&rows, "ann@receiver.test")["state"], "sent");
    let counts = &status(&path)["counts"];
    assert_eq!(
        (counts["sent"].as_u64(), counts["bounced"].as_u64()),
        (Some(1), Some(3))
    );
    let mut suppressed: Vec<String> = std::fs::read_to_string(&suppress)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    suppressed.sort_unstable();
    let mut expected = gone.map(str::to_owned).to_vec();
    expected.sort_unstable();
    assert_eq!(suppressed, expected);

    // The next campaign, with that suppression file, sends none of them.
    let sink = Sink::start();
    let next = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@receiver.test,Ann,en,gold");
    let next = gone
        .iter()
        .fold(next, |c, a| c.row(&format!("{a},Gone,en,gold")));
    let next_path = next.write();
    let toml = std::fs::read_to_string(&next_path).unwrap().replace(
        "path = \"recipients.csv\"\n",
        &format!(
            "path = \"recipients.csv\"\nsuppress = [\"{}\"]\n",
            suppress.display()
        ),
    );
    std::fs::write(&next_path, toml).unwrap();
    let second = run(&["send", next_path.to_str().unwrap()]);
    assert_eq!(second.code, 0, "{second:?}");
    let recipients: Vec<String> = sink
        .transactions()
        .iter()
        .flat_map(|t| t.rcpt_to.clone())
        .collect();
    assert_eq!(recipients, ["ann@receiver.test"]);
    assert_eq!(status(&next_path)["counts"]["suppressed"], 3);
}

#[test]
fn check_lists_every_missing_key_not_just_the_first() {
    // The bounce key and the SMTP password are both unset: `check` names both.
    let sink = Sink::start();
    let campaign = with_bounces(
        Campaign::example()
            .smtp(&sink, 1)
            .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
            .rows(crate::campaign::people(2)),
        "bounces@example.com",
    );
    let path = campaign.write();
    let run = mailer(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    for named in [
        "`MAILER_TEST_BOUNCE_KEY` named by [bounces] secret_env is not set",
        "`TEST_SMTP_PASSWORD` named by password_env is not set",
    ] {
        assert!(run.stdout.contains(named), "{named}: {}", run.stdout);
    }
    assert_eq!(sink.connections(), 0);
}
