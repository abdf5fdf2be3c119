//! What a campaign's templates may do, checked once on their syntax trees before any row
//! renders (invariant 12): nesting and partials are bounded, partials never include
//! themselves, and whatever would fail for every recipient fails here, once, naming the
//! template and line.
//!
//! - [`nesting`] scans the text before the parser sees it: a template nested deeper than
//!   [`MAX_NESTING`] would overflow the parser's stack, and parsing it costs the square of
//!   its depth.
//! - [`Shape::of`] reads one compiled template: the partials it includes, the `{{t}}` ids it
//!   translates, the CSV columns it reads, its unescaped output of recipient data.
//! - [`check`] puts the shapes together: missing partials, cycles, chains deeper than
//!   [`MAX_PARTIAL_DEPTH`], more than [`MAX_INCLUSIONS`] partials in one message, ids no
//!   locale defines, columns the CSV lacks, raw output of a column in the HTML, and
//!   `{{#each}}` loops (with the partials inside them) that repeat to more than [`MAX_STEPS`]
//!   template elements per message: a loop that writes nothing never meets the message's size
//!   limit, so its cost has to be bounded before it runs.

use std::collections::{BTreeMap, BTreeSet};

use handlebars::template::{
    DecoratorTemplate, HelperTemplate, Parameter, Template, TemplateElement,
};
use handlebars::{Path as JsonPath, PathSeg};

/// Blocks (and parentheses within a tag) nested in one template, at most.
pub const MAX_NESTING: usize = 32;
/// Partials including partials, at most: `html.hbs` → `a` → `b` … is a chain of this length.
pub const MAX_PARTIAL_DEPTH: usize = 16;
/// Partial inclusions one template may expand to (each inclusion counted as often as it is
/// reached), at most: seven files including the next ten times each would make a million.
pub const MAX_INCLUSIONS: u64 = 10_000;
/// Template elements one message may evaluate, at most, each counted as often as the
/// `{{#each}}` blocks around it (in its file or in the templates including it) may repeat it.
/// Twelve loops nested over five columns would be 244 million: rendering would hang.
pub const MAX_STEPS: u64 = 1_000_000;
/// The keys of the template context's root (`r`, `locale`, `campaign`, `unsubscribe_url`):
/// with the CSV's columns, what bounds the keys one `{{#each}}` can go through.
pub const ROOT_KEYS: u64 = 4;

/// Tags (`{{…}}`) in all the templates of a campaign, at most. The handlebars parser works out
/// the line of each element by counting from the start of its template, so compiling costs a
/// template's size for each tag: 5,000 tags in templates of [`crate::files::TEMPLATE_CAP`]
/// compile in seconds, where 26,000 in 300 KB took 16.
pub const MAX_TAGS: usize = 5_000;

/// Checks the nesting of blocks `{{#…}}`…`{{/…}}` and of parentheses inside a tag, without
/// parsing: `Err((line, message))` when deeper than [`MAX_NESTING`]. Gives the number of tags.
pub fn nesting(text: &str) -> Result<usize, (u64, String)> {
    let bytes = text.as_bytes();
    let (mut depth, mut line, mut at, mut tags) = (0usize, 1u64, 0usize, 0usize);
    while at < bytes.len() {
        match bytes[at] {
            b'\n' => line += 1,
            b'{' if bytes.get(at + 1) == Some(&b'{') && (at == 0 || bytes[at - 1] != b'\\') => {
                tags += 1;
                let mut inner = at + 2;
                while matches!(bytes.get(inner), Some(b'{' | b'~' | b' ')) {
                    inner += 1;
                }
                match bytes.get(inner) {
                    Some(b'#') => depth += 1,
                    Some(b'^') if !closes_at(bytes, inner + 1) => depth += 1,
                    Some(b'/') => depth = depth.saturating_sub(1),
                    _ => {}
                }
                if depth > MAX_NESTING {
                    return Err((line, too_deep("blocks")));
                }
                // Parentheses within the tag.
                let mut parens = 0usize;
                while inner < bytes.len() && !bytes[inner..].starts_with(b"}}") {
                    match bytes[inner] {
                        b'(' => parens += 1,
                        b')' => parens = parens.saturating_sub(1),
                        b'\n' => line += 1,
                        _ => {}
                    }
                    if parens > MAX_NESTING {
                        return Err((line, too_deep("parentheses")));
                    }
                    inner += 1;
                }
                at = inner;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    Ok(tags)
}

fn closes_at(bytes: &[u8], mut at: usize) -> bool {
    while matches!(bytes.get(at), Some(b' ' | b'~')) {
        at += 1;
    }
    bytes.get(at) == Some(&b'}')
}

fn too_deep(what: &str) -> String {
    format!(
        "{what} nested more than {MAX_NESTING} deep; mailer reads templates only up to that depth"
    )
}

/// What one compiled template does, as far as the checks need.
#[derive(Debug, Default)]
pub struct Shape {
    /// Partials included by name, with the line of each inclusion; `true` when a block
    /// (`{{#> name}}…{{/name}}`) gives a fallback for a missing partial.
    pub partials: Vec<(String, u64, bool)>,
    /// `{{t "id"}}` ids given literally, with their line.
    pub ids: Vec<(String, u64)>,
    /// Columns read as `r.<column>` in the template's own context, with their line.
    pub columns: Vec<(String, u64)>,
    /// Unescaped output of recipient data: (line, the column or `r`, the expression).
    pub raw: Vec<(u64, String, String)>,
    /// What the template may not do at all, with its line.
    pub refused: Vec<(u64, String)>,
    /// The deepest block nesting.
    pub depth: usize,
    /// Elements of this template, by how many `{{#each}}` blocks enclose them.
    pub steps: Vec<u64>,
    /// Partials included by name, with how many `{{#each}}` blocks enclose the inclusion.
    pub included: Vec<(String, u32)>,
}

impl Shape {
    #[must_use]
    pub fn of(template: &Template) -> Shape {
        let mut shape = Shape::default();
        shape.walk(template, 0, false, 0);
        shape
    }

    fn walk(&mut self, template: &Template, depth: usize, in_data: bool, loops: u32) {
        self.depth = self.depth.max(depth);
        for (index, element) in template.elements.iter().enumerate() {
            let line = template.mapping.get(index).map_or(0, |m| m.0 as u64);
            let at = loops as usize;
            if self.steps.len() <= at {
                self.steps.resize(at + 1, 0);
            }
            self.steps[at] += 1;
            match element {
                TemplateElement::Expression(helper) => self.expression(helper, line, in_data),
                TemplateElement::HtmlExpression(helper) => {
                    self.expression(helper, line, in_data);
                    if helper.name.as_name() != Some("t") {
                        let mut found = Vec::new();
                        data_in(helper, in_data, &mut found);
                        for column in found {
                            let shown = expression_text(helper);
                            self.raw.push((line, column, shown));
                        }
                    }
                }
                TemplateElement::HelperBlock(helper) => {
                    self.expression(helper, line, in_data);
                    // `#each r` or `#with r.x` makes recipient data the context inside.
                    let name = helper.name.as_name().unwrap_or_default();
                    let inner = in_data
                        || (!matches!(name, "if" | "unless") && {
                            let mut found = Vec::new();
                            data_in(helper, in_data, &mut found);
                            !found.is_empty()
                        });
                    // The body of `#each` runs once per key; its `{{else}}` at most once.
                    let body_loops = loops + u32::from(name == "each");
                    if let Some(nested) = &helper.template {
                        self.walk(nested, depth + 1, inner, body_loops);
                    }
                    if let Some(nested) = &helper.inverse {
                        self.walk(nested, depth + 1, inner, loops);
                    }
                }
                TemplateElement::PartialExpression(partial) => {
                    self.partial(partial, line, false, loops);
                }
                TemplateElement::PartialBlock(partial) => {
                    self.partial(partial, line, true, loops);
                    if let Some(nested) = &partial.template {
                        self.walk(nested, depth + 1, in_data, loops);
                    }
                }
                TemplateElement::DecoratorExpression(_) | TemplateElement::DecoratorBlock(_) => {
                    self.refused.push((
                        line,
                        "decorators such as `{{#*inline}}` are not supported; put the partial in a file under `partials/`".to_owned(),
                    ));
                }
                TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
                _ => self.refused.push((
                    line,
                    "this kind of template element is not supported".to_owned(),
                )),
            }
        }
    }

    fn expression(&mut self, helper: &HelperTemplate, line: u64, in_data: bool) {
        if helper.name.as_name() == Some("t")
            && let Some(Parameter::Literal(serde_json::Value::String(id))) = helper.params.first()
        {
            self.ids.push((id.clone(), line));
        }
        if in_data {
            return;
        }
        let params = helper.params.iter().chain(helper.hash.values());
        for parameter in std::iter::once(&helper.name).chain(params) {
            if let Some(Data::Column(column)) = column_of(parameter) {
                self.columns.push((column, line));
            }
        }
    }

    fn partial(&mut self, partial: &DecoratorTemplate, line: u64, has_fallback: bool, loops: u32) {
        match &partial.name {
            Parameter::Name(_) | Parameter::Path(_) => {
                let name = partial.name.as_name().unwrap_or_default();
                if name != "@partial-block" {
                    self.partials.push((name.to_owned(), line, has_fallback));
                    self.included.push((name.to_owned(), loops));
                }
            }
            _ => self.refused.push((
                line,
                "a partial's name must be written out (`{{> footer}}`): mailer checks every partial before sending, so it cannot choose one while rendering".to_owned(),
            )),
        }
    }
}

/// Recipient data a path reads.
enum Data {
    /// `r.<column>` (or `@root.r.<column>`).
    Column(String),
    /// `r` itself.
    Whole,
}

/// The recipient data `parameter` reads, if it is a path into it from the root.
fn column_of(parameter: &Parameter) -> Option<Data> {
    let Parameter::Path(JsonPath::Relative((segments, _))) = parameter else {
        return None;
    };
    let raw = parameter.as_name().unwrap_or_default();
    // `@root.` anchors at the root, where `r` is; `..` and `@…` do not name a column.
    let segments = if raw.starts_with("@root") {
        segments.get(1..).unwrap_or_default()
    } else {
        segments
    };
    let mut names = segments.iter();
    match (names.next(), names.next()) {
        (Some(PathSeg::Named(r)), next) if r == "r" => match next {
            Some(PathSeg::Named(column)) => Some(Data::Column(column.clone())),
            Some(_) => None,
            None => Some(Data::Whole),
        },
        _ => None,
    }
}

/// The recipient data an expression reads: columns (or `r` when not one column); inside a
/// block over recipient data, any path but the root's campaign values counts.
fn data_in(helper: &HelperTemplate, in_data: bool, found: &mut Vec<String>) {
    let params = helper.params.iter().chain(helper.hash.values());
    for parameter in std::iter::once(&helper.name).chain(params) {
        match parameter {
            Parameter::Path(path) => match column_of(parameter) {
                Some(Data::Column(column)) => found.push(column),
                Some(Data::Whole) => found.push("r".to_owned()),
                None if in_data && !matches!(path, JsonPath::Local(_)) => {
                    found.push("r".to_owned());
                }
                None => {}
            },
            Parameter::Subexpression(sub) => {
                if let TemplateElement::Expression(inner) = sub.as_element() {
                    data_in(inner, in_data, found);
                }
            }
            _ => {}
        }
    }
}

/// An expression as its author wrote it, near enough to find it: `{{{r.bio}}}`.
fn expression_text(helper: &HelperTemplate) -> String {
    let mut words = vec![helper.name.as_name().unwrap_or("…").to_owned()];
    for parameter in &helper.params {
        words.push(match parameter {
            Parameter::Name(name) => name.clone(),
            Parameter::Path(_) => parameter.as_name().unwrap_or("…").to_owned(),
            Parameter::Literal(value) => value.to_string(),
            _ => "(…)".to_owned(),
        });
    }
    format!("{{{{{{{}}}}}}}", words.join(" "))
}

/// What the templates are checked against.
pub struct Context<'a> {
    /// The names templates see the CSV's columns under.
    pub columns: Option<&'a BTreeSet<String>>,
    /// Columns the HTML may output unescaped (`[safety] raw_html_columns`).
    pub raw_columns: &'a [String],
    /// The loaded locales lacking an id, for each id.
    pub lacking: &'a dyn Fn(&str) -> Vec<String>,
    /// How many locales are loaded.
    pub locales: usize,
    /// The most keys one `{{#each}}` may go through: the CSV's columns, or [`ROOT_KEYS`].
    pub width: u64,
}

/// Every problem of the templates together: (template name, line, message). `tops` are the
/// templates a message renders (`subject`, `text`, `html`), `html` the one that escapes.
#[must_use]
pub fn check(
    shapes: &BTreeMap<String, Shape>,
    tops: &[&str],
    context: &Context<'_>,
) -> Vec<(String, u64, String)> {
    let mut found = Vec::new();
    for (name, shape) in shapes {
        for (line, message) in &shape.refused {
            found.push((name.clone(), *line, message.clone()));
        }
        if shape.depth > MAX_NESTING {
            found.push((name.clone(), 0, too_deep("blocks")));
        }
        for (partial, line, has_fallback) in &shape.partials {
            if !has_fallback && !shapes.contains_key(partial) {
                found.push((
                    name.clone(),
                    *line,
                    format!(
                        "includes the partial `{partial}`, but there is no `partials/{partial}.hbs`"
                    ),
                ));
            }
        }
        let mut ids_seen = BTreeSet::new();
        for (id, line) in &shape.ids {
            if !ids_seen.insert(id) {
                continue;
            }
            let lacking = (context.lacking)(id);
            if !lacking.is_empty() {
                let listed: Vec<String> = lacking.iter().map(|t| format!("`{t}`")).collect();
                let whom = if lacking.len() == context.locales {
                    "no locale defines it".to_owned()
                } else {
                    format!(
                        "missing for {} (and along the fallback chain)",
                        listed.join(", ")
                    )
                };
                found.push((
                    name.clone(),
                    *line,
                    format!("`{{{{t \"{id}\"}}}}`: there is no Fluent message `{id}`: {whom}"),
                ));
            }
        }
        if let Some(columns) = context.columns {
            let mut seen = BTreeSet::new();
            for (column, line) in &shape.columns {
                if !columns.contains(column) && seen.insert(column) {
                    found.push((
                        name.clone(),
                        *line,
                        format!("`r.{column}`: the recipient list has no column `{column}`"),
                    ));
                }
            }
        }
    }
    for top in tops {
        if inclusions(shapes, top, &mut found) {
            let total = steps(shapes, top, context.width, &mut BTreeMap::new());
            if total > MAX_STEPS {
                found.push((
                    (*top).to_owned(),
                    0,
                    format!(
                        "`{{{{#each}}}}` blocks nested in one another (with the partials inside them) may evaluate {total} template elements per message over {} keys each, more than {MAX_STEPS}: nest fewer loops",
                        context.width
                    ),
                ));
            }
        }
    }

    for name in reachable(shapes, "html") {
        for (line, column, shown) in &shapes[&name].raw {
            if !context.raw_columns.iter().any(|allowed| allowed == column) {
                let what = if column == "r" {
                    "recipient data".to_owned()
                } else {
                    format!("the CSV column `{column}`")
                };
                found.push((
                    name.clone(),
                    *line,
                    format!(
                        "`{shown}` writes {what} into the HTML unescaped, so the list's data could write markup or scripts; use `{{{{…}}}}`, or allow the column by name in `[safety] raw_html_columns`"
                    ),
                ));
            }
        }
    }
    // A partial shared by several templates is reported once.
    found.sort();
    found.dedup();
    found
}

/// The templates `top` includes, itself first, each once.
fn reachable(shapes: &BTreeMap<String, Shape>, top: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![top.to_owned()];
    let mut order = Vec::new();
    while let Some(name) = stack.pop() {
        if let Some(shape) = shapes.get(&name)
            && seen.insert(name.clone())
        {
            order.push(name);
            stack.extend(shape.partials.iter().map(|(p, _, _)| p.clone()));
        }
    }
    order
}

/// Walks the inclusions of `top`: a cycle, a chain deeper than [`MAX_PARTIAL_DEPTH`] or more
/// than [`MAX_INCLUSIONS`] inclusions in all is a problem naming the chain. `true` when there
/// is none, so the inclusions below `top` are a graph without cycles, at most that deep.
fn inclusions(
    shapes: &BTreeMap<String, Shape>,
    top: &str,
    found: &mut Vec<(String, u64, String)>,
) -> bool {
    // Inclusions below each template, memoised; a cycle is reported where it closes.
    let mut below: BTreeMap<String, u64> = BTreeMap::new();
    let mut chain = vec![top.to_owned()];
    let Some(total) = count(shapes, &mut chain, &mut below, found) else {
        return false;
    };
    if total > MAX_INCLUSIONS {
        found.push((
            top.to_owned(),
            0,
            format!(
                "expands to {total} partial inclusions per message, more than {MAX_INCLUSIONS}: partials that include partials several times multiply"
            ),
        ));
        return false;
    }
    true
}

/// The template elements one message evaluates from `name` down, each counted as often as the
/// `{{#each}}` blocks around it may repeat it (`width` keys each), saturating. Only for a
/// graph [`inclusions`] has found without cycles, so the recursion ends within
/// [`MAX_PARTIAL_DEPTH`].
fn steps(
    shapes: &BTreeMap<String, Shape>,
    name: &str,
    width: u64,
    memo: &mut BTreeMap<String, u64>,
) -> u64 {
    if let Some(&known) = memo.get(name) {
        return known;
    }
    let Some(shape) = shapes.get(name) else {
        return 0;
    };
    let repeat = |loops: u32| width.saturating_pow(loops);
    let mut total = 0u64;
    for (loops, &elements) in (0u32..).zip(&shape.steps) {
        total = total.saturating_add(elements.saturating_mul(repeat(loops)));
    }
    for (partial, loops) in &shape.included {
        let inner = steps(shapes, partial, width, memo).saturating_add(1);
        total = total.saturating_add(inner.saturating_mul(repeat(*loops)));
    }
    memo.insert(name.to_owned(), total);
    total
}

/// Inclusions below the last template of `chain`; `None` once a problem is reported.
fn count(
    shapes: &BTreeMap<String, Shape>,
    chain: &mut Vec<String>,
    below: &mut BTreeMap<String, u64>,
    found: &mut Vec<(String, u64, String)>,
) -> Option<u64> {
    let name = chain.last().cloned().unwrap_or_default();
    if let Some(&known) = below.get(&name) {
        return Some(known);
    }
    let shape = shapes.get(&name)?;
    let mut total = 0u64;
    for (partial, line, _) in &shape.partials {
        if !shapes.contains_key(partial) {
            continue;
        }
        if let Some(start) = chain.iter().position(|n| n == partial) {
            let mut cycle: Vec<String> = chain[start..].to_vec();
            cycle.push(partial.clone());
            found.push((
                name.clone(),
                *line,
                format!(
                    "partials include each other in a loop: {}",
                    cycle.join(" → ")
                ),
            ));
            return None;
        }
        if chain.len() > MAX_PARTIAL_DEPTH {
            found.push((
                name.clone(),
                *line,
                format!(
                    "partials nested more than {MAX_PARTIAL_DEPTH} deep: {} → {partial}",
                    chain.join(" → ")
                ),
            ));
            return None;
        }
        chain.push(partial.clone());
        let inner = count(shapes, chain, below, found);
        chain.pop();
        total = total.saturating_add(1).saturating_add(inner?);
        if total > MAX_INCLUSIONS {
            break;
        }
    }
    below.insert(name, total);
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(text: &str) -> Shape {
        Shape::of(&Template::compile(text).unwrap())
    }

    fn shapes(files: &[(&str, &str)]) -> BTreeMap<String, Shape> {
        files
            .iter()
            .map(|(name, text)| ((*name).to_owned(), shape(text)))
            .collect()
    }

    fn problems(files: &[(&str, &str)], raw_columns: &[String]) -> Vec<String> {
        let columns: BTreeSet<String> = ["email", "name", "plan"].map(str::to_owned).into();
        let lacking = |id: &str| -> Vec<String> {
            if id == "missing" {
                vec!["en".to_owned()]
            } else {
                vec![]
            }
        };
        let context = Context {
            columns: Some(&columns),
            raw_columns,
            lacking: &lacking,
            locales: 2,
            width: 4,
        };
        check(&shapes(files), &["subject", "text", "html"], &context)
            .into_iter()
            .map(|(name, line, message)| format!("{name}:{line}: {message}"))
            .collect()
    }

    #[test]
    fn nesting_counts_blocks_and_parentheses_but_not_escaped_or_else_tags() {
        let deep = |n: usize| format!("{}x{}", "{{#if a}}".repeat(n), "{{/if}}".repeat(n));
        assert_eq!(nesting(&deep(MAX_NESTING)), Ok(2 * MAX_NESTING));
        assert_eq!(
            nesting("{{a}} \\{{b}} {{{c}}} {{#if x}}{{^}}{{/if}}"),
            Ok(5)
        );
        let (line, message) = nesting(&format!("a\n{}", deep(MAX_NESTING + 1))).unwrap_err();
        assert_eq!(line, 2);
        assert!(
            message.starts_with("blocks nested more than 32 deep"),
            "{message}"
        );
        // `{{^}}` is an else, `\{{#` is text: neither opens a block.
        let elses = format!(
            "{}{}",
            "{{#if a}}x{{^}}y{{/if}}".repeat(100),
            "\\{{#if a}}".repeat(100)
        );
        assert!(nesting(&elses).is_ok());
        let inverse = format!("{}{}", "{{^if a}}".repeat(40), "{{/if}}".repeat(40));
        assert!(nesting(&inverse).is_err());
        let parens = format!("{{{{t \"x\" a={}1{}}}}}", "(".repeat(40), ")".repeat(40));
        assert!(nesting(&parens).unwrap_err().1.starts_with("parentheses"));
    }

    #[test]
    fn cycles_depth_and_fan_out_are_found_on_the_graph() {
        let found = problems(
            &[
                ("text", "{{> a}}"),
                ("a", "{{> b}}"),
                ("b", "{{#if x}}{{> a}}{{/if}}"),
            ],
            &[],
        );
        assert_eq!(
            found,
            ["b:1: partials include each other in a loop: a → b → a"]
        );
        let mut chain: Vec<(String, String)> = (0..20)
            .map(|i| (format!("p{i}"), format!("{{{{> p{}}}}}", i + 1)))
            .collect();
        chain.push(("p20".to_owned(), "end".to_owned()));
        chain.push(("text".to_owned(), "{{> p0}}".to_owned()));
        let files: Vec<(&str, &str)> = chain
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let found = problems(&files, &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("partials nested more than 16 deep: text → p0 → p1"),
            "{found:?}"
        );
        let fan = "{{> leaf}}".repeat(10);
        let found = problems(
            &[
                ("text", "{{> a}}"),
                ("a", &"{{> b}}".repeat(10)),
                ("b", &"{{> c}}".repeat(10)),
                ("c", &"{{> d}}".repeat(10)),
                ("d", &fan),
                ("leaf", "x"),
            ],
            &[],
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("text:0: expands to "), "{found:?}");
        // The same partial many times, but few in all, is fine.
        assert!(problems(&[("text", &"{{> leaf}}".repeat(100)), ("leaf", "x")], &[]).is_empty());
    }

    #[test]
    fn loops_that_would_repeat_past_the_step_limit_are_refused_before_rendering() {
        // Found by the campaign_loader fuzz target (tests/fuzz/regressions/campaign_loader/
        // nested_each_hang): twelve loops over the root write nothing, so the message's size
        // limit never stops them, and rendering hangs.
        let nested =
            |n: usize| format!("{}{}", "{{#each @root.r}}".repeat(n), "{{/each}}".repeat(n));
        let found = problems(&[("text", &nested(12))], &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("text:0: `{{#each}}` blocks nested in one another"),
            "{found:?}"
        );
        assert!(problems(&[("text", &nested(3))], &[]).is_empty());
        // Loops multiply across partials too: a chain of eleven, one loop each.
        let mut files: Vec<(String, String)> = (0..11)
            .map(|i| {
                (
                    format!("p{i}"),
                    format!("{{{{#each r}}}}{{{{> p{}}}}}{{{{/each}}}}", i + 1),
                )
            })
            .collect();
        files.push(("p11".to_owned(), "x".to_owned()));
        files.push(("html".to_owned(), "{{> p0}}".to_owned()));
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let found = problems(&files, &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("html:0: `{{#each}}`"), "{found:?}");
        // An `{{else}}` runs once, not once per key.
        let elses = format!(
            "{}{}",
            "{{#each r}}x{{else}}".repeat(12),
            "{{/each}}".repeat(12)
        );
        assert!(problems(&[("text", &elses)], &[]).is_empty());
    }

    #[test]
    fn raw_output_of_recipient_data_is_found_wherever_it_comes_from() {
        let raw = |html: &str| problems(&[("html", html)], &[]);
        for data in [
            "{{{r.name}}}",
            "{{& r.name}}",
            "{{{@root.r.name}}}",
            "{{{this.r.name}}}",
            "{{{lookup r \"name\"}}}",
            "{{#each r}}{{{this}}}{{/each}}",
            "{{#with r}}{{{name}}}{{/with}}",
            "{{#if r.name}}{{{r.plan}}}{{/if}}",
        ] {
            assert_eq!(raw(data).len(), 1, "{data}: {:?}", raw(data));
        }
        for fine in [
            "{{r.name}}",
            "{{{t \"x\" name=r.name}}}",
            "{{{locale}}}",
            "{{{campaign.id}}}",
            "{{#if r.name}}{{{locale}}}{{/if}}",
        ] {
            assert!(raw(fine).is_empty(), "{fine}: {:?}", raw(fine));
        }
        let allowed = problems(&[("html", "{{{r.name}}}")], &["name".to_owned()]);
        assert!(allowed.is_empty(), "{allowed:?}");
        // In the text part nothing is escaped anyway.
        assert!(problems(&[("text", "{{{r.name}}}")], &[]).is_empty());
    }

    #[test]
    fn ids_and_columns_are_checked_once_per_template() {
        let found = problems(
            &[(
                "text",
                "{{t \"missing\"}}{{t \"missing\"}}\n{{r.nosuch}} {{r.nosuch}} {{#with r}}{{other}}{{/with}}",
            )],
            &[],
        );
        assert_eq!(
            found,
            [
                "text:1: `{{t \"missing\"}}`: there is no Fluent message `missing`: missing for `en` (and along the fallback chain)",
                "text:2: `r.nosuch`: the recipient list has no column `nosuch`",
            ]
        );
    }
}
