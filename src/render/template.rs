//! Handlebars templates: registered once, shared by every rendering thread.
//!
//! Two registries, because escaping is per registry: `plain` (no escaping) for the subject and
//! the text part, `html` (HTML escaping) for the HTML part. Both are strict, so a variable no
//! column provides is an error, and both have the `t` helper that calls Fluent.
//! [`Templates::load`] reads the folder (the edge); [`Templates::from_sources`] is pure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluent_bundle::{FluentArgs, FluentValue};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason,
};

use super::bounds;
use super::locale::Locales;
use crate::files::Folders;
use crate::problem::{Problem, Problems};

/// Which template produced a piece of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Subject => "subject",
            Part::Text => "text",
            Part::Html => "html",
        }
    }
}

/// The files of a template folder: `subject.hbs`, `text.hbs` and/or `html.hbs`, `partials/*.hbs`.
#[derive(Debug, Default)]
pub struct TemplateSources {
    pub subject: Option<(PathBuf, String)>,
    pub text: Option<(PathBuf, String)>,
    pub html: Option<(PathBuf, String)>,
    pub partials: Vec<(String, PathBuf, String)>,
}

/// The names of the templates a message is made of, in the order of [`Part`].
const TOPS: [&str; 3] = ["subject", "text", "html"];

/// The files a template folder's loader reads, whether or not they can be read: the
/// fingerprint hashes exactly these.
#[must_use]
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = TOPS
        .iter()
        .map(|name| dir.join(format!("{name}.hbs")))
        .filter(|path| path.symlink_metadata().is_ok())
        .collect();
    found.extend(crate::files::listed(&dir.join("partials"), "hbs").unwrap_or_default());
    found
}

impl TemplateSources {
    /// Reads the folder's files: regular files within [`crate::files::TEMPLATE_CAP`], links
    /// only inside `folders`. What cannot be read is a problem naming the file.
    #[must_use]
    pub fn read(dir: &Path, folders: &Folders) -> (TemplateSources, Problems) {
        let mut problems = Problems::default();
        let mut read = |path: &Path| -> Option<String> {
            match folders.read_text(path, crate::files::TEMPLATE_CAP) {
                Ok(text) => Some(text),
                // A dangling link is missing too; say where it points.
                Err(error) if error.is_missing() && path.symlink_metadata().is_err() => None,
                Err(error) => {
                    problems.push(Problem::error(
                        path,
                        None,
                        format!("this template {}", error.reason()),
                    ));
                    None
                }
            }
        };
        let mut sources = TemplateSources::default();
        let mut partials = Vec::new();
        for path in files(dir) {
            let Some(text) = read(&path) else {
                continue;
            };
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.parent() == Some(dir) {
                let slot = match name.as_str() {
                    "subject" => &mut sources.subject,
                    "text" => &mut sources.text,
                    _ => &mut sources.html,
                };
                *slot = Some((path, text));
            } else {
                partials.push((name, path, text));
            }
        }
        sources.partials = partials;
        (sources, problems)
    }
}

/// What the templates are compiled against, besides the locales.
pub struct Limits<'a> {
    /// The names templates see the CSV's columns under; `None` to skip that check.
    pub columns: Option<&'a BTreeSet<String>>,
    /// `[safety] raw_html_columns`.
    pub raw_columns: &'a [String],
    /// `[safety] max_message_size`: the most bytes the parts of one message may render to.
    pub max_message_size: usize,
}

/// The compiled templates of a campaign.
pub struct Templates {
    plain: Handlebars<'static>,
    html: Handlebars<'static>,
    has_text: bool,
    has_html: bool,
    /// Template name → file, to name the file in render errors.
    files: HashMap<String, PathBuf>,
    max_message_size: usize,
}

impl Templates {
    pub fn load(
        dir: &Path,
        folders: &Folders,
        locales: &Arc<Locales>,
        limits: &Limits<'_>,
    ) -> Result<Templates, Problems> {
        let (sources, mut problems) = TemplateSources::read(dir, folders);
        match Templates::from_sources(dir, &sources, locales, limits) {
            Ok(templates) if problems.0.is_empty() => Ok(templates),
            Ok(_) => Err(problems),
            Err(more) => {
                problems.extend(more);
                Err(problems)
            }
        }
    }

    /// Compiles the sources; `dir` only names the folder in problems.
    pub fn from_sources(
        dir: &Path,
        sources: &TemplateSources,
        locales: &Arc<Locales>,
        limits: &Limits<'_>,
    ) -> Result<Templates, Problems> {
        let mut problems = Problems::default();
        if sources.subject.is_none() {
            problems.push(Problem::error(
                dir,
                None,
                "the template folder has no `subject.hbs`",
            ));
        }
        if sources.text.is_none() && sources.html.is_none() {
            problems.push(Problem::error(
                dir,
                None,
                "the template folder needs `text.hbs`, `html.hbs` or both",
            ));
        }
        problems.extend(scanned(dir, sources));
        if problems.errors() > 0 {
            return Err(problems);
        }
        let mut plain = registry(Arc::clone(locales), false);
        let mut html = registry(Arc::clone(locales), true);
        let mut files = HashMap::new();
        for (name, path, text) in &sources.partials {
            if TOPS.contains(&name.as_str()) {
                problems.push(Problem::error(
                    path,
                    None,
                    format!("a partial cannot be named `{name}`: that is the name of the {name} template"),
                ));
                continue;
            }
            problems.extend(register(&mut [&mut plain, &mut html], name, path, text));
            files.insert(name.clone(), path.clone());
        }
        for (part, source) in [
            (Part::Subject, &sources.subject),
            (Part::Text, &sources.text),
            (Part::Html, &sources.html),
        ] {
            if let Some((path, text)) = source {
                let registry = if part == Part::Html {
                    &mut html
                } else {
                    &mut plain
                };
                // Editors end files with a newline; a subject is one line.
                let text = if part == Part::Subject {
                    text.trim()
                } else {
                    text.as_str()
                };
                problems.extend(register(&mut [registry], part.name(), path, text));
                files.insert(part.name().to_owned(), path.clone());
            }
        }
        if problems.errors() > 0 {
            return Err(problems);
        }
        let shapes: BTreeMap<String, bounds::Shape> = plain
            .get_templates()
            .iter()
            .filter(|(name, _)| name.as_str() != "html")
            .chain(
                html.get_templates()
                    .iter()
                    .filter(|(name, _)| name.as_str() == "html"),
            )
            .map(|(name, template)| (name.clone(), bounds::Shape::of(template)))
            .collect();
        let lacking = |id: &str| -> Vec<String> {
            locales.lacking(id).into_iter().map(str::to_owned).collect()
        };
        let context = bounds::Context {
            columns: limits.columns,
            raw_columns: limits.raw_columns,
            lacking: &lacking,
            locales: locales.tags().count(),
            // `r` holds one key per column; the root holds `ROOT_KEYS`.
            width: limits
                .columns
                .map_or(0, |columns| columns.len() as u64)
                .max(bounds::ROOT_KEYS),
        };
        for (name, line, message) in bounds::check(&shapes, &TOPS, &context) {
            let path = files.get(&name).map_or(dir, PathBuf::as_path);
            problems.push(Problem::error(path, (line > 0).then_some(line), message));
        }
        if problems.errors() > 0 {
            return Err(problems);
        }
        Ok(Templates {
            plain,
            html,
            has_text: sources.text.is_some(),
            has_html: sources.html.is_some(),
            files,
            max_message_size: limits.max_message_size,
        })
    }

    #[must_use]
    pub fn has_text(&self) -> bool {
        self.has_text
    }

    #[must_use]
    pub fn has_html(&self) -> bool {
        self.has_html
    }

    /// The most bytes one message's parts may render to, together.
    #[must_use]
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Renders one part for one recipient's context, within `budget` bytes (what is left of
    /// the message's size limit; the part's size is taken from it). Rendering stops as soon
    /// as the budget is spent. The error names the template file and line.
    pub fn render(&self, part: Part, data: &Context, budget: &mut usize) -> Result<String, String> {
        let registry = if part == Part::Html {
            &self.html
        } else {
            &self.plain
        };
        let mut out = Capped {
            text: Vec::new(),
            room: *budget,
            full: false,
        };
        match registry.render_with_context_to_write(part.name(), data, &mut out) {
            Ok(()) => {}
            Err(_) if out.full => {
                return Err(format!(
                    "the message grows past {} while `{}.hbs` renders (`[safety] max_message_size`): a template or partial repeats too much, or the data is too large",
                    crate::files::size(self.max_message_size as u64),
                    part.name()
                ));
            }
            Err(error) => return Err(self.describe(part, &error)),
        }
        *budget = out.room;
        // The writer only ever receives the `&str`s handlebars renders.
        String::from_utf8(out.text)
            .map_err(|_| format!("`{}.hbs` rendered invalid UTF-8", part.name()))
    }

    fn describe(&self, part: Part, error: &RenderError) -> String {
        let name = error
            .template_name
            .clone()
            .unwrap_or_else(|| part.name().to_owned());
        let file = self
            .files
            .get(&name)
            .map_or(name, |path| path.display().to_string());
        let line = error
            .line_no
            .map(|line| format!(":{line}"))
            .unwrap_or_default();
        let reason = match error.reason() {
            RenderErrorReason::MissingVariable(Some(path)) => {
                format!("`{path}` has no value (no such CSV column, or an empty one)")
            }
            RenderErrorReason::Other(message) => message.clone(),
            other => other.to_string(),
        };
        format!("{file}{line}: {reason}")
    }
}

/// Every template's nesting, before any is parsed, and the tags of all of them together.
fn scanned(dir: &Path, sources: &TemplateSources) -> Vec<Problem> {
    let tops = [&sources.subject, &sources.text, &sources.html];
    let all = tops
        .into_iter()
        .flatten()
        .map(|(path, text)| (path, text))
        .chain(sources.partials.iter().map(|(_, path, text)| (path, text)));
    let mut problems = Vec::new();
    let mut tags = 0;
    for (path, text) in all {
        match bounds::nesting(text) {
            Ok(count) => tags += count,
            Err((line, message)) => problems.push(Problem::error(path, Some(line), message)),
        }
    }
    if tags > bounds::MAX_TAGS {
        problems.push(Problem::error(
            dir,
            None,
            format!(
                "the templates hold {tags} tags (`{{{{…}}}}`) in all, more than {}; mailer compiles at most that many",
                bounds::MAX_TAGS
            ),
        ));
    }
    problems
}

/// Compiles one template into `registry` (its nesting and tags known to be within bounds).
fn register(
    registries: &mut [&mut Handlebars<'static>],
    name: &str,
    path: &Path,
    text: &str,
) -> Option<Problem> {
    // Compiled once for every registry: compiling is the costly part.
    match handlebars::Template::compile_with_name(text, name.to_owned()) {
        Ok(template) => {
            for registry in registries {
                registry.register_template(name, template.clone());
            }
            None
        }
        Err(error) => {
            let line = error.pos().map(|(line, _)| line as u64);
            // The parser's list of expected tokens is long and says little; the line says more.
            let reason = error.reason().to_string();
            let reason = reason.split(": expected").next().unwrap_or(&reason);
            Some(Problem::error(
                path,
                line,
                format!("template syntax error: {reason} (an unclosed block, or a stray `{{{{`?)"),
            ))
        }
    }
}

fn registry(locales: Arc<Locales>, escape_html: bool) -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    if !escape_html {
        registry.register_escape_fn(handlebars::no_escape);
    }
    registry.register_helper(
        "t",
        Box::new(Translate {
            locales,
            escape_html,
        }),
    );
    registry
}

/// `{{t "message-id" name=r.name count=3}}`: the recipient's translation of a Fluent message.
/// Escapes its output itself in the HTML registry, since helpers write straight to the output.
struct Translate {
    locales: Arc<Locales>,
    escape_html: bool,
}

impl HelperDef for Translate {
    fn call<'reg: 'rc, 'rc>(
        &self,
        helper: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        context: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let fail = |message: String| -> RenderError { RenderErrorReason::Other(message).into() };
        let id = helper
            .param(0)
            .and_then(|p| p.value().as_str())
            .ok_or_else(|| {
                fail("`t` needs a message id in quotes, as in {{t \"greeting\"}}".to_owned())
            })?;
        let tag = context
            .data()
            .get("locale")
            .and_then(|l| l.as_str())
            .unwrap_or_default();
        let index = self
            .locales
            .index_of(tag)
            .ok_or_else(|| fail(format!("`t` found no loaded locale `{tag}`")))?;
        let mut args = FluentArgs::new();
        for (name, value) in helper.hash() {
            let value = value.value();
            let fluent = if let Some(text) = value.as_str() {
                FluentValue::from(text.to_owned())
            } else if let Some(number) = value.as_f64() {
                FluentValue::from(number)
            } else {
                return Err(fail(format!(
                    "argument `{name}` of `t \"{id}\"` has no text or number value"
                )));
            };
            args.set(*name, fluent);
        }
        let text = self.locales.translate(index, id, &args).map_err(fail)?;
        if self.escape_html {
            out.write(&handlebars::html_escape(&text))?;
        } else {
            out.write(&text)?;
        }
        Ok(())
    }
}

/// A writer that takes at most `room` bytes, then fails: a runaway template stops at the
/// limit instead of building the whole message.
struct Capped {
    text: Vec<u8>,
    room: usize,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if bytes.len() > self.room {
            self.room = 0;
            self.full = true;
            return Err(std::io::Error::other("the message size limit"));
        }
        self.room -= bytes.len();
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
