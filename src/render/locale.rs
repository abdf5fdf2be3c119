//! Fluent translations per locale, with an explicit fallback chain per message.
//!
//! [`Locales::load`] reads `<locales>/<tag>/*.ftl` (the edge); [`Locales::from_sources`] is pure.
//! A recipient's locale resolves to the best loaded one (`fr-CA`, else `fr`, else the default);
//! each message id is then looked up along that locale's chain, so a locale may override only
//! some ids. A missing id or argument is an error, never a silently empty string.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fluent_bundle::concurrent::FluentBundle;
use fluent_bundle::{FluentArgs, FluentResource};
use unic_langid::LanguageIdentifier;

use crate::problem::{Problem, Problems, line_of};

/// One locale's translations. The concurrent bundle is `Sync`, so rendering threads share it.
struct Locale {
    id: LanguageIdentifier,
    tag: String,
    bundle: FluentBundle<FluentResource>,
    /// The message ids this locale defines itself, sorted.
    ids: Vec<String>,
}

/// Every loaded locale and the fallback chain of each.
pub struct Locales {
    entries: Vec<Locale>,
    default: usize,
    /// For each locale, the indexes to try in order: itself, its bare language, the default.
    chains: Vec<Vec<usize>>,
    by_tag: HashMap<String, usize>,
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
                    for error in errors {
                        let (message, line) = match &error {
                            fluent_bundle::FluentError::Overriding { id, .. } => (
                                format!(
                                    "`{id}` is defined twice in the locale `{}`",
                                    id_tag(bundle.locales.first())
                                ),
                                source
                                    .find(&format!("\n{id} "))
                                    .map(|at| line_of(&source, at + 1)),
                            ),
                            other => (other.to_string(), None),
                        };
                        problems.push(Problem::error(&path, line, message));
                    }
                }
            }
            ids.sort();
            locales.push(Locale {
                tag: id.to_string(),
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
            .map(|index| {
                let mut chain = vec![index];
                let bare =
                    LanguageIdentifier::from_parts(locales[index].id.language, None, None, &[]);
                if let Some(parent) = locales.iter().position(|l| l.id == bare)
                    && !chain.contains(&parent)
                {
                    chain.push(parent);
                }
                if !chain.contains(&default_index) {
                    chain.push(default_index);
                }
                chain
            })
            .collect();
        let by_tag = locales
            .iter()
            .enumerate()
            .map(|(i, l)| (l.tag.clone(), i))
            .collect();
        Ok(Locales {
            entries: locales,
            default: default_index,
            chains,
            by_tag,
        })
    }

    /// The loaded locale for a recipient's requested one: exact, else its bare language, else
    /// the default. `fr_CA` is read as `fr-CA`.
    #[must_use]
    pub fn resolve(&self, requested: Option<&str>) -> usize {
        let Some(id) =
            requested.and_then(|r| r.replace('_', "-").parse::<LanguageIdentifier>().ok())
        else {
            return self.default;
        };
        if let Some(exact) = self.entries.iter().position(|l| l.id == id) {
            return exact;
        }
        let bare = LanguageIdentifier::from_parts(id.language, None, None, &[]);
        self.entries
            .iter()
            .position(|l| l.id == bare)
            .unwrap_or(self.default)
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

    #[test]
    fn placeables_are_not_wrapped_in_isolation_marks() {
        check(Some("en"), "hello", "Hello Zoé!");
    }
}
