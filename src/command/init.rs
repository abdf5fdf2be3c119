//! `mailer init DIR`: a working campaign folder to start from.
//!
//! The templates, locales and sample list are the repository's own example (compiled in), so
//! what `init` writes is exactly what the test suite checks.

use std::path::Path;

use anyhow::Context as _;

use crate::exit::Exit;
use crate::printable::Shown;

const CAMPAIGN: &str = r#"# A campaign scaffolded by `mailer init`. Check it with `mailer check campaign.toml`,
# then `mailer send campaign.toml --dry-run`. The file transport writes .eml files into outbox/;
# switch [transport] to `kind = "smtp"` with a `url` to send for real.

[campaign]
id = "my-campaign"
from = "Example <news@example.com>"
reply_to = "Example Support <support@example.com>"
template = "templates"
locales = "locales"
default_locale = "en"
kind = "announcement"

[recipients]
path = "recipients.csv"

[transport]
kind = "file"
outbox = "outbox"

# When to send. Without [schedule], a send may run at any time. Windows and daily caps count
# in `timezone` (an IANA name); outside a window, or once the day's cap is reached, `send`
# starts nothing and exits 75 saying when it may go on. See the README, "Send windows, daily
# caps and warm-up".
# [schedule]
# timezone = "Europe/Paris"
# window = ["Mon-Fri 09:00-17:00", "Sat 10:00-14:00"]

# How fast to send. Without [rate], as fast as the relay takes it. See the README for
# per-domain paces, batches and [retry].
[rate]
per_second = 20
# per_day = 10000                  # messages a calendar day, retries included, every run together
# warmup = [500, 1000, 2000, 5000] # caps of the first days since the first message, then per_day

# [rate.per_domain_per_day]        # a domain's own daily cap (published provider limits)
# "gmail.com" = 2000
"#;

const FILES: [(&str, &str); 10] = [
    ("campaign.toml", CAMPAIGN),
    (
        "recipients.csv",
        include_str!("../../config/recipients.csv"),
    ),
    (
        "templates/subject.hbs",
        include_str!("../../templates/subject.hbs"),
    ),
    (
        "templates/text.hbs",
        include_str!("../../templates/text.hbs"),
    ),
    (
        "templates/html.hbs",
        include_str!("../../templates/html.hbs"),
    ),
    (
        "templates/partials/footer.hbs",
        include_str!("../../templates/partials/footer.hbs"),
    ),
    (
        "locales/en/main.ftl",
        include_str!("../../locales/en/main.ftl"),
    ),
    (
        "locales/fr/main.ftl",
        include_str!("../../locales/fr/main.ftl"),
    ),
    (
        "locales/fr-CA/main.ftl",
        include_str!("../../locales/fr-CA/main.ftl"),
    ),
    (
        "locales/de/main.ftl",
        include_str!("../../locales/de/main.ftl"),
    ),
];

/// Writes the scaffold into `dir`, which must not exist or be empty, and says what next.
pub fn run(dir: &Path, out: &mut impl std::io::Write) -> anyhow::Result<Exit> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read `{}`", dir.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!("`{}` is not empty; give a new folder", dir.display());
    }
    for (name, text) in FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        std::fs::write(&path, text)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    writeln!(
        out,
        "created a campaign in `{}`; try: mailer check {}",
        Shown(dir.display()),
        Shown(dir.join("campaign.toml").display())
    )?;
    Ok(Exit::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaffold_shows_the_calendar_keys_and_they_read_once_uncommented() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c");
        run(&target, &mut Vec::new()).unwrap();
        let path = target.join("campaign.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let keys = [
            "[schedule]",
            "timezone",
            "window",
            "per_day",
            "warmup",
            "[rate.per_domain_per_day]",
            "\"gmail.com\"",
        ];
        let mut uncommented = String::new();
        for line in text.lines() {
            uncommented.push_str(match line.strip_prefix("# ") {
                Some(rest) if keys.iter().any(|k| rest.starts_with(k)) => rest,
                _ => line,
            });
            uncommented.push('\n');
        }
        assert_ne!(uncommented, text, "the keys are there, commented");
        let campaign = crate::config::parse(&path, &uncommented).unwrap();
        assert_eq!(
            campaign.schedule.calendar.timezone,
            chrono_tz::Tz::Europe__Paris
        );
        assert_eq!(campaign.schedule.calendar.windows.len(), 2);
        assert_eq!(campaign.rate.daily.global(0), Some(500));
        assert_eq!(campaign.rate.daily.global(9), Some(10_000));
        assert_eq!(campaign.rate.daily.domain("gmail.com"), Some(2000));
        // As scaffolded, none of it is on.
        let plain = crate::config::parse(&path, &text).unwrap();
        assert!(plain.schedule.calendar.windows.is_empty() && !plain.rate.daily.any());
    }
}
