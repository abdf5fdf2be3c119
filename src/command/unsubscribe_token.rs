//! `mailer unsubscribe-token`: a recipient's unsubscribe token and link, or whether a token
//! is theirs.

use std::path::Path;

use crate::config;
use crate::exit::{Exit, Failure};
use crate::recipients;
use crate::render;

pub fn run(
    path: &Path,
    address: &str,
    verify: Option<&str>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let campaign = config::load(path)?;
    let Some(config::Unsubscribe {
        url: Some(url),
        secret_env: Some(name),
        ..
    }) = &campaign.unsubscribe
    else {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "campaign `{}` has no `[unsubscribe] url`: there is no token",
                campaign.id
            ),
        )
        .into());
    };
    let key = std::env::var(name).map_err(|_| {
        Failure::new(
            Exit::InvalidInput,
            format!(
                "the environment variable `{name}` named by [unsubscribe] secret_env is not set"
            ),
        )
    })?;
    let address = recipients::normalise(address).map_err(|why| {
        Failure::new(
            Exit::Usage,
            format!(
                "`{}` is not an address: {why}",
                crate::printable::Shown(address)
            ),
        )
    })?;
    let key = key.as_bytes();
    match verify {
        Some(token) => {
            let valid = render::unsubscribe::verify(key, &campaign.id, &address.key, token);
            writeln!(out, "{}", if valid { "valid" } else { "invalid" })?;
            Ok(if valid {
                Exit::Complete
            } else {
                Exit::PermanentFailures
            })
        }
        None => {
            writeln!(
                out,
                "{}",
                render::unsubscribe::token(key, &campaign.id, &address.key)
            )?;
            writeln!(
                out,
                "{}",
                render::unsubscribe::link(url, key, &campaign.id, &address.key)
            )?;
            Ok(Exit::Complete)
        }
    }
}
