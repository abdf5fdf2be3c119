//! Handlebars templates: registered once, shared by every rendering thread.
//!
//! Two registries, because escaping is per registry: `plain` (no escaping) for the subject and
//! the text part, `html` (HTML escaping) for the HTML part. Both are strict, so a variable no
//! column provides is an error, and both have the `t` helper that calls Fluent.
//! [`Templates::load`] reads the folder (the edge); [`Templates::from_sources`] is pure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use fluent_bundle::{FluentArgs, FluentValue};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason,
};

use super::locale::Locales;
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

impl TemplateSources {
    pub fn read(dir: &Path) -> anyhow::Result<TemplateSources> {
        let read = |name: &str| -> anyhow::Result<Option<(PathBuf, String)>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read the template `{}` (templates are UTF-8)",
                    path.display()
                )
            })?;
            Ok(Some((path, text)))
        };
        let mut sources = TemplateSources {
            subject: read("subject.hbs")?,
            text: read("text.hbs")?,
            html: read("html.hbs")?,
            partials: vec![],
        };
        let partials = dir.join("partials");
        if partials.is_dir() {
            for path in super::files_with_extension(&partials, "hbs")? {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the partial `{}`", path.display()))?;
                sources.partials.push((name, path, text));
            }
        }
        Ok(sources)
    }
}

/// The compiled templates of a campaign.
pub struct Templates {
    plain: Handlebars<'static>,
    html: Handlebars<'static>,
    has_text: bool,
    has_html: bool,
    /// Template name → file, to name the file in render errors.
    files: HashMap<String, PathBuf>,
}

impl Templates {
    pub fn load(dir: &Path, locales: Arc<Locales>) -> anyhow::Result<Result<Templates, Problems>> {
        Ok(Templates::from_sources(
            dir,
            &TemplateSources::read(dir)?,
            locales,
        ))
    }

    /// Compiles the sources; `dir` only names the folder in problems.
    pub fn from_sources(
        dir: &Path,
        sources: &TemplateSources,
        locales: Arc<Locales>,
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
        let mut plain = registry(Arc::clone(&locales), false);
        let mut html = registry(locales, true);
        let mut files = HashMap::new();
        let mut register = |registry: &mut Handlebars<'static>,
                            name: &str,
                            path: &Path,
                            text: &str,
                            partial: bool| {
            let result = if partial {
                registry.register_partial(name, text)
            } else {
                registry.register_template_string(name, text)
            };
            if let Err(error) = result {
                let line = error.pos().map(|(line, _)| line as u64);
                // The parser's list of expected tokens is long and says little; the line says more.
                let reason = error.reason().to_string();
                let reason = reason.split(": expected").next().unwrap_or(&reason);
                problems.push(Problem::error(
                    path,
                    line,
                    format!(
                        "template syntax error: {reason} (an unclosed block, or a stray `{{{{`?)"
                    ),
                ));
            }
        };
        for (name, path, text) in &sources.partials {
            register(&mut plain, name, path, text, true);
            register(&mut html, name, path, text, true);
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
                register(registry, part.name(), path, text, false);
                files.insert(part.name().to_owned(), path.clone());
            }
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

    /// Renders one part for one recipient's context; the error names the template file and line.
    pub fn render(&self, part: Part, data: &Context) -> Result<String, String> {
        let registry = if part == Part::Html {
            &self.html
        } else {
            &self.plain
        };
        registry
            .render_with_context(part.name(), data)
            .map_err(|error| self.describe(part, &error))
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
