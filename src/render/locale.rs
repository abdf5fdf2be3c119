//! Fluent translations per locale, with an explicit fallback chain per message.
//!
//! [`Locales::load`] reads `<locales>/<tag>/*.ftl` (the edge); [`Locales::from_sources`] is pure.
//! A recipient's requested locale is negotiated against the loaded ones with fluent-langneg's
//! lookup and CLDR's likely subtags ([`Locales::negotiate`]): `fr-BE` gets `fr`, `zh-TW` gets
//! `zh-Hant`, `pt-BR` gets `pt-PT` when there is no `pt`, but never a locale of another script
//! (`zh-CN` does not get `zh-Hant`); what nothing serves gets the default. Each message id is
//! then looked up along the served locale's chain (`fr-CA → fr → en`), so a locale may override
//! only some ids. A missing id or argument is an error, never a silently empty string.
//! [`Locales::requests`] counts the requests no folder serves as asked, for the operator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fluent_bundle::concurrent::FluentBundle;
use fluent_bundle::{FluentArgs, FluentResource};
use fluent_langneg::{NegotiationStrategy, negotiate_languages};
use unic_langid::LanguageIdentifier;
use unic_langid::subtags::Script;

use crate::problem::{Problem, Problems, line_of};

/// One locale's translations. The concurrent bundle is `Sync`, so rendering threads share it.
struct Locale {
    id: LanguageIdentifier,
    tag: String,
    bundle: FluentBundle<FluentResource>,
    /// The message ids this locale defines itself, sorted.
    ids: Vec<String>,
    /// The script its readers read: its own, else the likely one (`zh-TW` → `Hant`).
    script: Option<Script>,
}

/// Every loaded locale and the fallback chain of each.
pub struct Locales {
    entries: Vec<Locale>,
    default: usize,
    /// For each locale, the indexes to try in order: itself, its loaded parents of the same
    /// script (`zh-Hant-TW → zh-Hant`, `pt-PT → pt`), the default.
    chains: Vec<Vec<usize>>,
    by_tag: HashMap<String, usize>,
    /// The indexes of the locales, most subtags first, for negotiation: fluent-langneg takes
    /// the first that fits, and `zh-Hant-TW` fits `zh-TW` better than `zh-Hant` does.
    specific_first: Vec<usize>,
}

impl std::fmt::Debug for Locales {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locales")
            .field("tags", &self.tags().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The `.ftl` files of one locale: (path, text).
pub type LocaleSources = (LanguageIdentifier, Vec<(PathBuf, String)>);

/// The `.ftl` files of one locale folder, as listed (links included).
fn files_in(folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(crate::files::listed(folder, "ftl")?)
}

/// The files a locales folder's loader reads, whether or not they can be read: the
/// fingerprint hashes exactly these. Folders that are not language tags hold none.
#[must_use]
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut folders: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_dir()
                && path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.parse::<LanguageIdentifier>().is_ok())
        })
        .collect();
    folders.sort();
    folders
        .iter()
        .flat_map(|folder| files_in(folder).unwrap_or_default())
        .collect()
}

impl Locales {
    /// Reads every `<dir>/<tag>/*.ftl`. Folder names must be language tags.
    pub fn load(
        dir: &Path,
        within: &crate::files::Folders,
        default: &LanguageIdentifier,
    ) -> anyhow::Result<Result<Locales, Problems>> {
        let mut problems = Problems::default();
        let mut sources = Vec::new();
        let mut folders: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the locales folder `{}`", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot read the locales folder `{}`", dir.display()))?;
        folders.sort_by_key(std::fs::DirEntry::file_name);
        for folder in folders {
            let path = folder.path();
            if !path.is_dir() {
                continue;
            }
            let name = folder.file_name().to_string_lossy().into_owned();
            let Ok(id) = name.parse::<LanguageIdentifier>() else {
                problems.push(Problem::error(
                    &path,
                    None,
                    format!(
                        "the locale folder `{name}` is not a language tag such as `en` or `fr-CA`"
                    ),
                ));
                continue;
            };
            let mut texts = Vec::new();
            for file in files_in(&path)? {
                match within.read_text(&file, crate::files::SOURCE_CAP) {
                    Ok(text) => texts.push((file, text)),
                    Err(error) => problems.push(Problem::error(
                        &file,
                        None,
                        format!("this Fluent file {}", error.reason()),
                    )),
                }
            }
            sources.push((id, texts));
        }
        if !problems.0.is_empty() {
            return Ok(Err(problems));
        }
        Ok(Locales::from_sources(dir, sources, default))
    }

    /// Builds the bundles from sources; `dir` only names the folder in problems.
    pub fn from_sources(
        dir: &Path,
        sources: Vec<LocaleSources>,
        default: &LanguageIdentifier,
    ) -> Result<Locales, Problems> {
        let mut problems = Problems::default();
        let mut locales = Vec::new();
        for (id, files) in sources {
            let mut bundle = FluentBundle::new_concurrent(vec![id.clone()]);
            // Without this, U+2068/U+2069 wrap every placeable and subjects turn non-ASCII.
            bundle.set_use_isolating(false);
            let mut ids = Vec::new();
            for (path, text) in files {
                let resource = match FluentResource::try_new(text) {
                    Ok(resource) => resource,
                    Err((resource, errors)) => {
                        for error in errors {
                            // The start of the broken entry, rather than where the parser gave up.
                            let at = error
                                .slice
                                .as_ref()
                                .map_or(error.pos.start, |slice| slice.start);
                            let line = line_of(resource.source(), at);
                            problems.push(Problem::error(
                                &path,
                                Some(line),
                                format!("Fluent syntax error: {}", error.kind),
                            ));
                        }
                        continue;
                    }
                };
                let source = resource.source().to_owned();
                ids.extend(resource.entries().filter_map(|entry| match entry {
                    fluent_syntax::ast::Entry::Message(message) => Some(message.id.name.to_owned()),
                    _ => None,
                }));
                if let Err(errors) = bundle.add_resource(resource) {
                    // How many times each id has been reported in this file so far.
                    let mut reported: HashMap<(bool, String), usize> = HashMap::new();
                    let overridden = |error: &fluent_bundle::FluentError| match error {
                        // fluent-bundle does not export `EntryKind`; its name says it.
                        fluent_bundle::FluentError::Overriding { kind, id } => {
                            Some((kind.to_string() == "term", id.clone()))
                        }
                        _ => None,
                    };
                    let mut totals: HashMap<(bool, String), usize> = HashMap::new();
                    for key in errors.iter().filter_map(overridden) {
                        *totals.entry(key).or_default() += 1;
                    }
                    for error in errors {
                        let (message, line) = match overridden(&error) {
                            Some((term, id)) => {
                                let key = (term, id.clone());
                                let nth = reported.entry(key.clone()).or_default();
                                let line = duplicate_line(&source, term, &id, *nth, totals[&key]);
                                *nth += 1;
                                let shown = if term { format!("-{id}") } else { id };
                                (
                                    format!(
                                        "`{shown}` is defined twice in the locale `{}`",
                                        id_tag(bundle.locales.first())
                                    ),
                                    line,
                                )
                            }
                            None => (error.to_string(), None),
                        };
                        problems.push(Problem::error(&path, line, message));
                    }
                }
            }
            ids.sort();
            locales.push(Locale {
                tag: id.to_string(),
                script: likely_script(&id),
                id,
                bundle,
                ids,
            });
        }
        let Some(default_index) = locales.iter().position(|l| &l.id == default) else {
            problems.push(Problem::error(
                dir,
                None,
                format!("the default locale `{default}` has no folder here"),
            ));
            return Err(problems);
        };
        if problems.errors() > 0 {
            return Err(problems);
        }
        let chains = (0..locales.len())
            .map(|index| chain(&locales, index, default_index))
            .collect();
        let by_tag = locales
            .iter()
            .enumerate()
            .map(|(i, l)| (l.tag.clone(), i))
            .collect();
        let mut specific_first: Vec<usize> = (0..locales.len()).collect();
        specific_first.sort_by_key(|&i| {
            let id = &locales[i].id;
            std::cmp::Reverse(
                usize::from(id.script.is_some())
                    + usize::from(id.region.is_some())
                    + id.variants().len(),
            )
        });
        Ok(Locales {
            entries: locales,
            default: default_index,
            chains,
            by_tag,
            specific_first,
        })
    }

    /// The loaded locale for a recipient's requested one (see [`Locales::negotiate`]); the
    /// default when the row asks for none.
    #[must_use]
    pub fn resolve(&self, requested: Option<&str>) -> usize {
        requested.map_or(self.default, |requested| self.negotiate(requested).0)
    }

    /// The loaded locale that serves `requested`, and how well. Case and `_` or `-` do not
    /// matter, and BCP 47 extensions and private use (`-u-ca-gregory`, `-x-…`) are dropped
    /// first. Then fluent-langneg's lookup with CLDR's likely subtags picks among the loaded
    /// locales of the same script: `zh-TW` and `zh-HK` read Traditional Chinese and get
    /// `zh-Hant`; `zh-CN` reads Simplified and does not, since Traditional is not what it
    /// asked for. Nothing found (or not a language tag): the default.
    #[must_use]
    pub fn negotiate(&self, requested: &str) -> (usize, Fit) {
        if let Some(&exact) = self.by_tag.get(requested) {
            return (exact, Fit::Served);
        }
        let Some(id) = language_id(requested) else {
            return (self.default, Fit::Unserved);
        };
        if let Some(exact) = self.entries.iter().position(|l| l.id == id) {
            return (exact, Fit::Served);
        }
        let mut likely = id.clone();
        likely.maximize();
        let script = likely.script;
        let candidates: Vec<&LanguageIdentifier> = self
            .specific_first
            .iter()
            .map(|&i| &self.entries[i])
            .filter(|l| script.is_none() || l.script.is_none() || l.script == script)
            .map(|l| &l.id)
            .collect();
        let found = negotiate_languages(&[&id], &candidates, None, NegotiationStrategy::Lookup)
            .first()
            .and_then(|&&found| {
                self.entries
                    .iter()
                    .position(|l| std::ptr::eq(&raw const l.id, found))
            });
        let Some(index) = found else {
            return (self.default, Fit::Unserved);
        };
        let served = &self.entries[index].id;
        // The same locale or a more general one (`fr` for `fr-BE`, `zh-Hant` for `zh-TW`).
        if served.matches(&id, true, false) || served.matches(&likely, true, false) {
            (index, Fit::Served)
        } else {
            (index, Fit::Near)
        }
    }

    #[must_use]
    pub fn tag(&self, index: usize) -> &str {
        &self.entries[index].tag
    }

    #[must_use]
    pub fn index_of(&self, tag: &str) -> Option<usize> {
        self.by_tag.get(tag).copied()
    }

    /// Every loaded locale's tag, in folder order.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|l| l.tag.as_str())
    }

    /// The chain of tags tried for `index`, for messages to the user.
    #[must_use]
    pub fn chain_description(&self, index: usize) -> String {
        self.chains[index]
            .iter()
            .map(|&i| self.tag(i))
            .collect::<Vec<_>>()
            .join(" → ")
    }

    /// Formats message `id` for the locale at `index`, trying its chain in order.
    pub fn translate(&self, index: usize, id: &str, args: &FluentArgs) -> Result<String, String> {
        let (message_id, attribute) = match id.split_once('.') {
            Some((message, attribute)) => (message, Some(attribute)),
            None => (id, None),
        };
        for &candidate in &self.chains[index] {
            let bundle = &self.entries[candidate].bundle;
            let Some(message) = bundle.get_message(message_id) else {
                continue;
            };
            let pattern = match attribute {
                None => message.value(),
                Some(name) => message.get_attribute(name).map(|a| a.value()),
            };
            let Some(pattern) = pattern else {
                return Err(format!(
                    "the Fluent message `{id}` in `{}` has no value",
                    self.tag(candidate)
                ));
            };
            let mut errors = Vec::new();
            let text = bundle.format_pattern(pattern, Some(args), &mut errors);
            if let Some(error) = errors.first() {
                return Err(format!(
                    "the Fluent message `{id}` in `{}` cannot be formatted: {error}",
                    self.tag(candidate)
                ));
            }
            return Ok(text.into_owned());
        }
        Err(format!(
            "the Fluent message `{id}` exists in none of {}",
            self.chain_description(index)
        ))
    }

    /// The loaded locales whose chain has no `id` (`message` or `message.attribute`) with a
    /// value: `{{t "id"}}` fails for every recipient of those.
    #[must_use]
    pub fn lacking(&self, id: &str) -> Vec<&str> {
        let (message_id, attribute) = match id.split_once('.') {
            Some((message, attribute)) => (message, Some(attribute)),
            None => (id, None),
        };
        (0..self.entries.len())
            .filter(|&index| {
                !self.chains[index].iter().any(|&candidate| {
                    let bundle = &self.entries[candidate].bundle;
                    bundle
                        .get_message(message_id)
                        .is_some_and(|message| match attribute {
                            None => message.value().is_some(),
                            Some(name) => message.get_attribute(name).is_some(),
                        })
                })
            })
            .map(|index| self.tag(index))
            .collect()
    }

    /// Message ids of the default locale that the locale at `index` does not define itself,
    /// each with the tag of the locale its chain takes it from.
    #[must_use]
    pub fn fallbacks(&self, index: usize) -> Vec<(String, &str)> {
        self.entries[self.default]
            .ids
            .iter()
            .filter(|id| !self.entries[index].bundle.has_message(id))
            .filter_map(|id| {
                let served = self.chains[index]
                    .iter()
                    .find(|&&i| self.entries[i].bundle.has_message(id))?;
                Some((id.clone(), self.tag(*served)))
            })
            .collect()
    }
}

/// How well the locale a recipient gets fits the one the row asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// The locale asked for, or a more general one (`fr` for `fr-BE`, `zh-Hant` for `zh-TW`),
    /// whatever the case, separators and extensions.
    Served,
    /// Another region, script variant or regional form of the language (`pt-PT` for `pt-BR`).
    Near,
    /// No loaded locale serves it (or it is not a language tag): the default.
    Unserved,
}

/// Distinct requested locales told apart; requests beyond them are counted together.
pub const TRACKED: usize = 1000;
/// Requests a report names one by one, most recipients first.
pub const LISTED: usize = 10;
/// Characters of a requested locale kept and shown.
const SHOWN_CHARS: usize = 64;

/// The locales recipients asked for that no folder serves as asked, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatches {
    /// The [`LISTED`] requests with the most recipients.
    pub listed: Vec<Mismatch>,
    /// The other requests not served as asked: distinct tags (among the [`TRACKED`] told apart).
    pub more_tags: usize,
    /// …and their recipients, those of the requests not told apart included.
    pub more_recipients: usize,
    /// Whether some requests came after the first [`TRACKED`] distinct ones.
    pub untracked: bool,
}

/// One requested locale not served as asked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// As the rows wrote it, escaped (see [`shown`]).
    pub requested: String,
    /// The loaded locale these recipients get.
    pub served: String,
    pub fit: Fit,
    pub recipients: usize,
}

impl Locales {
    /// Counts the requested locales of `cells` (a row's `locale`, if any) by how they are
    /// served, and lists those not served as asked. Memory stays bounded whatever the cells:
    /// [`TRACKED`] distinct values at most, each cut to 64 characters.
    pub fn requests<'a>(&self, cells: impl Iterator<Item = Option<&'a str>>) -> Mismatches {
        let mut seen: HashMap<Box<str>, (usize, Fit, usize)> = HashMap::new();
        let mut untracked = 0;
        for cell in cells.flatten() {
            if self.by_tag.contains_key(cell) {
                continue;
            }
            let key = kept(cell);
            if let Some((_, _, count)) = seen.get_mut(&*key) {
                *count += 1;
                continue;
            }
            let (index, fit) = self.negotiate(cell);
            if seen.len() < TRACKED {
                // Served ones are kept too, so that the next row asking for one is a lookup.
                seen.insert(key.into(), (index, fit, 1));
            } else if fit != Fit::Served {
                untracked += 1;
            }
        }
        let mut all: Vec<Mismatch> = seen
            .into_iter()
            .filter(|(_, (_, fit, _))| *fit != Fit::Served)
            .map(|(requested, (index, fit, recipients))| Mismatch {
                requested: shown(&requested),
                served: self.tag(index).to_owned(),
                fit,
                recipients,
            })
            .collect();
        all.sort_by(|a, b| {
            b.recipients
                .cmp(&a.recipients)
                .then_with(|| a.requested.cmp(&b.requested))
        });
        let more = all.split_off(all.len().min(LISTED));
        Mismatches {
            listed: all,
            more_tags: more.len(),
            more_recipients: more.iter().map(|m| m.recipients).sum::<usize>() + untracked,
            untracked: untracked > 0,
        }
    }
}

impl Mismatches {
    /// One line per listed request, then one for the rest: "3 recipients asked for
    /// \`x-klingon\`; no locale folder serves it, so they get \`en\`".
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .listed
            .iter()
            .map(|m| {
                let who = recipients(m.recipients);
                let (requested, served) = (&m.requested, &m.served);
                match m.fit {
                    Fit::Near => format!(
                        "{who} asked for `{requested}`; they get `{served}`, the nearest locale folder"
                    ),
                    Fit::Served | Fit::Unserved => format!(
                        "{who} asked for `{requested}`; no locale folder serves it, so they get `{served}`"
                    ),
                }
            })
            .collect();
        if self.more_recipients > 0 {
            let count = self.more_recipients;
            let who = format!(
                "{count} more recipient{}",
                if count == 1 { "" } else { "s" }
            );
            lines.push(if self.untracked {
                format!(
                    "and {who} asked for other locales no folder serves as asked (only the first {TRACKED} distinct values are told apart)"
                )
            } else {
                let tags = self.more_tags;
                let plural = if tags == 1 { "" } else { "s" };
                format!("and {who} asked for {tags} other locale{plural} no folder serves as asked")
            });
        }
        lines
    }
}

fn recipients(count: usize) -> String {
    format!("{count} recipient{}", if count == 1 { "" } else { "s" })
}

/// A requested locale as kept: its first 64 characters, `…` after them when there are more.
fn kept(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.char_indices().nth(SHOWN_CHARS) {
        None => cell.into(),
        Some((at, _)) => format!("{}…", &cell[..at]).into(),
    }
}

/// A value from the recipient list made safe to print (see [`crate::printable`]), so a CSV cell
/// cannot drive a terminal.
fn shown(value: &str) -> String {
    crate::printable::escape(value).into_owned()
}

/// The indexes of the locales message ids are looked up in for the locale at `index`: itself,
/// its loaded parents (variants, then region, then script dropped), the default. A parent of
/// another script is skipped: `zh` (Simplified) is no parent of `zh-Hant`, as in CLDR.
fn chain(locales: &[Locale], index: usize, default: usize) -> Vec<usize> {
    let own = &locales[index];
    let mut chain = vec![index];
    let mut parent = own.id.clone();
    loop {
        if parent.variants().len() > 0 {
            parent.clear_variants();
        } else if parent.region.is_some() {
            parent.region = None;
        } else if parent.script.is_some() {
            parent.script = None;
        } else {
            break;
        }
        let found = locales.iter().position(|l| {
            l.id == parent && (l.script.is_none() || own.script.is_none() || l.script == own.script)
        });
        if let Some(found) = found
            && !chain.contains(&found)
        {
            chain.push(found);
        }
    }
    if !chain.contains(&default) {
        chain.push(default);
    }
    chain
}

/// The script a locale's readers read: its own script subtag, else CLDR's likely one.
fn likely_script(id: &LanguageIdentifier) -> Option<Script> {
    id.script.or_else(|| {
        let mut likely = id.clone();
        likely.maximize();
        likely.script
    })
}

/// The language identifier of a requested locale, without its BCP 47 extensions and private
/// use, which unic-langid does not parse: they start at the first one-letter subtag
/// (`pt-PT-u-ca-gregory` → `pt-PT`; `x-klingon` → nothing). `None` for no language.
fn language_id(requested: &str) -> Option<LanguageIdentifier> {
    let requested = requested.trim();
    let mut end = 0;
    for subtag in requested.split(['-', '_']) {
        if subtag.len() == 1 {
            break;
        }
        end += subtag.len() + 1;
    }
    let core = &requested[..end.saturating_sub(1).min(requested.len())];
    if core.is_empty() {
        return None;
    }
    let id = LanguageIdentifier::from_bytes(core.as_bytes()).ok()?;
    (!id.language.is_empty()).then_some(id)
}

/// The line of the `nth` (0-based) of `reported` redefinitions of message (or term) `id` in
/// `source`: fluent reports each entry whose id is taken, in file order, so when there are as
/// many reports as entries in the file, all of them redefine an earlier file's id; with one
/// fewer, the file's first entry is the original.
fn duplicate_line(source: &str, term: bool, id: &str, nth: usize, reported: usize) -> Option<u64> {
    let prefix = if term { "-" } else { "" };
    let starts: Vec<u64> = (1u64..)
        .zip(source.split('\n'))
        .filter(|(_, line)| {
            line.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix(id))
                .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with('='))
        })
        .map(|(number, _)| number)
        .collect();
    let first = starts.len().checked_sub(reported)?;
    starts.get(first + nth).copied()
}

fn id_tag(id: Option<&LanguageIdentifier>) -> String {
    id.map_or_else(String::new, ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locales(sources: &[(&str, &str)]) -> Result<Locales, Problems> {
        let sources = sources
            .iter()
            .map(|(tag, text)| {
                (
                    tag.parse().unwrap(),
                    vec![(PathBuf::from(format!("{tag}/main.ftl")), (*text).to_owned())],
                )
            })
            .collect();
        Locales::from_sources(Path::new("locales"), sources, &"en".parse().unwrap())
    }

    fn sample() -> Locales {
        locales(&[
            (
                "en",
                "hello = Hello { $name }!\nbye = Bye\nsubject = News\n",
            ),
            ("fr", "hello = Bonjour { $name } !\nbye = Au revoir\n"),
            ("fr-CA", "bye = Salut\n"),
        ])
        .unwrap()
    }

    fn check(requested: Option<&str>, id: &str, expected: &str) {
        let l = sample();
        let mut args = FluentArgs::new();
        args.set("name", "Zoé");
        assert_eq!(
            l.translate(l.resolve(requested), id, &args).as_deref(),
            Ok(expected),
            "{requested:?} {id}"
        );
    }

    #[test]
    fn an_id_defined_twice_is_reported_on_the_line_of_the_second() {
        // Found by the campaign_loader fuzz target (tests/fuzz/regressions/campaign_loader/
        // duplicate_term_line): a term, or an entry on a file's first line, had no line.
        let lines = |sources: &[(&str, &str)]| -> Vec<String> {
            locales(sources)
                .unwrap_err()
                .0
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            lines(&[("en", "-brand = A\nx = y\n-brand = B\nx=z\n")]),
            [
                "en/main.ftl:3: `-brand` is defined twice in the locale `en`",
                "en/main.ftl:4: `x` is defined twice in the locale `en`",
            ]
        );
        // Across files: the second file's first entry is the redefinition.
        let sources = vec![(
            "en".parse().unwrap(),
            vec![
                (PathBuf::from("en/a.ftl"), "x = 1\n-t = 1\n".to_owned()),
                (
                    PathBuf::from("en/b.ftl"),
                    "-t = 2\nx = 2\nx = 3\n".to_owned(),
                ),
            ],
        )];
        let found: Vec<String> =
            Locales::from_sources(Path::new("locales"), sources, &"en".parse().unwrap())
                .unwrap_err()
                .0
                .iter()
                .map(ToString::to_string)
                .collect();
        assert_eq!(
            found,
            [
                "en/b.ftl:1: `-t` is defined twice in the locale `en`",
                "en/b.ftl:2: `x` is defined twice in the locale `en`",
                "en/b.ftl:3: `x` is defined twice in the locale `en`",
            ]
        );
    }

    #[test]
    fn each_id_falls_back_along_the_chain() {
        check(Some("fr-CA"), "bye", "Salut");
        check(Some("fr_CA"), "hello", "Bonjour Zoé !");
        check(Some("fr-CA"), "subject", "News");
        check(Some("fr-BE"), "bye", "Au revoir");
        check(Some("de"), "hello", "Hello Zoé!");
        check(None, "bye", "Bye");
        check(Some("not a tag!"), "bye", "Bye");
    }

    #[test]
    fn missing_ids_and_arguments_are_errors() {
        let l = sample();
        let fr_ca = l.resolve(Some("fr-CA"));
        let error = l.translate(fr_ca, "nope", &FluentArgs::new()).unwrap_err();
        assert_eq!(
            error,
            "the Fluent message `nope` exists in none of fr-CA → fr → en"
        );
        let error = l.translate(fr_ca, "hello", &FluentArgs::new()).unwrap_err();
        assert!(
            error.contains("cannot be formatted") && error.contains("name"),
            "{error}"
        );
    }

    #[test]
    fn fallbacks_name_the_locale_each_id_comes_from() {
        let l = sample();
        let from = |tag: &str| -> Vec<(String, String)> {
            l.fallbacks(l.resolve(Some(tag)))
                .into_iter()
                .map(|(id, served)| (id, served.to_owned()))
                .collect()
        };
        let pair = |id: &str, served: &str| (id.to_owned(), served.to_owned());
        assert_eq!(
            from("fr-CA"),
            vec![pair("hello", "fr"), pair("subject", "en")]
        );
        assert_eq!(from("fr"), vec![pair("subject", "en")]);
        assert_eq!(from("en"), vec![]);
    }

    #[test]
    fn syntax_errors_name_the_file_and_line_and_a_missing_default_is_an_error() {
        let problems = locales(&[("en", "ok = fine\n\nbroken = { $\n")]).unwrap_err();
        assert_eq!(problems.0[0].line, Some(3), "{problems:?}");
        assert!(problems.0[0].path.ends_with("en/main.ftl"));
        let problems = locales(&[("fr", "ok = oui\n")]).unwrap_err();
        assert!(
            problems.0[0]
                .message
                .contains("default locale `en` has no folder")
        );
    }

    /// Folders `en` (the default), `pt-PT` and `zh-Hant`, as a translator might have them.
    fn regional() -> Locales {
        locales(&[
            ("en", "hello = Hello\n"),
            ("pt-PT", "hello = Olá\n"),
            ("zh-Hant", "hello = 你好\n"),
        ])
        .unwrap()
    }

    #[test]
    fn requests_negotiate_as_a_translator_expects() {
        let l = regional();
        let table: &[(&str, &str, Fit)] = &[
            ("pt-PT", "pt-PT", Fit::Served),
            ("pt-BR", "pt-PT", Fit::Near),
            ("pt", "pt-PT", Fit::Near),
            ("pt_pt", "pt-PT", Fit::Served),
            ("pt-PT-u-ca-gregory", "pt-PT", Fit::Served),
            ("pt-PT-t-en-x-mine", "pt-PT", Fit::Served),
            ("zh-Hant", "zh-Hant", Fit::Served),
            ("zh-Hant-TW", "zh-Hant", Fit::Served),
            ("zh_Hant_TW", "zh-Hant", Fit::Served),
            ("zh-TW", "zh-Hant", Fit::Served),
            ("zh-HK", "zh-Hant", Fit::Served),
            ("zh-MO", "zh-Hant", Fit::Served),
            // Simplified readers are not given Traditional: not what they asked for.
            ("zh-CN", "en", Fit::Unserved),
            ("zh-Hans", "en", Fit::Unserved),
            ("zh-Hans-SG", "en", Fit::Unserved),
            ("zh", "en", Fit::Unserved),
            ("en", "en", Fit::Served),
            ("EN_us", "en", Fit::Served),
            ("en-GB", "en", Fit::Served),
            (" en ", "en", Fit::Served),
            ("de", "en", Fit::Unserved),
            ("x-klingon", "en", Fit::Unserved),
            ("i-klingon", "en", Fit::Unserved),
            ("und", "en", Fit::Unserved),
            ("", "en", Fit::Unserved),
            ("-", "en", Fit::Unserved),
            ("not a tag!", "en", Fit::Unserved),
            ("pt-\u{1b}[31m", "en", Fit::Unserved),
            ("ещё", "en", Fit::Unserved),
        ];
        for &(requested, served, fit) in table {
            let (index, got) = l.negotiate(requested);
            assert_eq!((l.tag(index), got), (served, fit), "{requested:?}");
            assert_eq!(l.resolve(Some(requested)), index, "{requested:?}");
        }
        assert_eq!(l.tag(l.resolve(None)), "en");
    }

    #[test]
    fn a_general_folder_wins_over_a_near_one_and_regions_find_the_likely_one() {
        let l = locales(&[
            ("en", "hello = Hello\n"),
            ("pt", "hello = Olá\n"),
            ("pt-PT", "hello = Olá!\n"),
            ("fr-FR", "hello = Bonjour\n"),
            ("fr-CA", "hello = Allo\n"),
            ("sr", "hello = Здраво\n"),
        ])
        .unwrap();
        for (requested, served, fit) in [
            ("pt-BR", "pt", Fit::Served),
            ("pt-PT", "pt-PT", Fit::Served),
            ("pt-AO", "pt", Fit::Served),
            ("fr-BE", "fr-FR", Fit::Near),
            ("fr", "fr-FR", Fit::Served),
            ("fr-ca", "fr-CA", Fit::Served),
            ("sr-Cyrl-RS", "sr", Fit::Served),
            ("sr-Latn", "en", Fit::Unserved),
        ] {
            let (index, got) = l.negotiate(requested);
            assert_eq!((l.tag(index), got), (served, fit), "{requested:?}");
        }
    }

    #[test]
    fn chains_keep_to_the_script_and_take_every_loaded_parent() {
        let l = locales(&[
            ("en", "hello = Hello\nbye = Bye\n"),
            ("pt", "hello = Olá\nbye = Tchau\n"),
            ("pt-PT", "bye = Adeus\n"),
            ("zh", "hello = 你好\n"),
            ("zh-Hant", "hello = 妳好\n"),
            ("zh-Hant-TW", "bye = 再見\n"),
            ("sr", "hello = Здраво\n"),
            ("sr-Latn", "bye = Zdravo\n"),
        ])
        .unwrap();
        let chain = |tag: &str| l.chain_description(l.index_of(tag).unwrap());
        assert_eq!(chain("pt-PT"), "pt-PT → pt → en");
        assert_eq!(chain("zh-Hant-TW"), "zh-Hant-TW → zh-Hant → en");
        assert_eq!(chain("zh-Hant"), "zh-Hant → en");
        assert_eq!(chain("zh"), "zh → en");
        assert_eq!(chain("sr-Latn"), "sr-Latn → en");
        assert_eq!(chain("en"), "en");
        let args = FluentArgs::new();
        let say =
            |requested: &str, id: &str| l.translate(l.resolve(Some(requested)), id, &args).unwrap();
        assert_eq!(say("pt-PT", "hello"), "Olá");
        assert_eq!(say("pt-PT", "bye"), "Adeus");
        assert_eq!(say("zh-TW", "bye"), "再見");
        assert_eq!(say("zh-TW", "hello"), "妳好");
        assert_eq!(say("zh-HK", "bye"), "Bye");
        assert_eq!(say("zh-CN", "hello"), "你好");
    }

    #[test]
    fn requests_not_served_as_asked_are_counted_by_tag() {
        let l = regional();
        let cells = [
            Some("pt-BR"),
            Some("x-klingon"),
            None,
            Some("pt-PT"),
            Some("pt-BR"),
            Some("zh-TW"),
            Some("x-klingon"),
            Some("EN_us"),
            Some("x-klingon"),
            Some("bad\u{1b}[2J"),
        ];
        let found = l.requests(cells.into_iter());
        assert_eq!(
            found.lines(),
            vec![
                "3 recipients asked for `x-klingon`; no locale folder serves it, so they get `en`",
                "2 recipients asked for `pt-BR`; they get `pt-PT`, the nearest locale folder",
                "1 recipient asked for `bad\\x1b[2J`; no locale folder serves it, so they get `en`",
            ]
        );
        assert_eq!(found.more_recipients, 0);
    }

    #[test]
    fn requests_stay_bounded_whatever_the_cells() {
        let l = regional();
        let cells: Vec<String> = (0..TRACKED + 500).map(|i| format!("q{i:04}x")).collect();
        let long = "y".repeat(10_000);
        let found = l.requests(
            std::iter::repeat_n(Some("x-klingon"), 7).chain(
                cells
                    .iter()
                    .map(|c| Some(c.as_str()))
                    .chain([Some("pt-BR"), Some(long.as_str())]),
            ),
        );
        assert_eq!(found.listed.len(), LISTED);
        assert_eq!(found.listed[0].requested, "x-klingon");
        assert_eq!(found.listed[0].recipients, 7);
        assert!(found.untracked);
        let listed: usize = found.listed.iter().map(|m| m.recipients).sum();
        assert_eq!(listed + found.more_recipients, TRACKED + 500 + 2 + 7);
        assert_eq!(found.more_tags, TRACKED - LISTED);
        let lines = found.lines();
        assert_eq!(lines.len(), LISTED + 1);
        assert!(
            lines[LISTED].starts_with("and 1493 more recipients asked for other locales"),
            "{lines:?}"
        );

        let longer = format!("{long}z");
        let found = l.requests([Some(long.as_str()), Some(longer.as_str())].into_iter());
        assert_eq!(
            found.listed[0].requested,
            format!("{}…", "y".repeat(SHOWN_CHARS))
        );
        assert_eq!(found.listed[0].recipients, 2, "one request as shown");
    }

    #[test]
    fn placeables_are_not_wrapped_in_isolation_marks() {
        check(Some("en"), "hello", "Hello Zoé!");
    }
}
