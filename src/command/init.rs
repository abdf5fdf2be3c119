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

# How fast to send. Without [rate], as fast as the relay takes it. See the README for
# per-domain paces, batches and [retry].
[rate]
per_second = 20
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
