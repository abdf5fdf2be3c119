//! The module order of ARCHITECTURE.md holds in the code: every module of `src/` is listed
//! there, `src/lib.rs` declares them in that order, and no module uses one listed after it
//! (read from the `crate::` paths of its files, imports and qualified paths alike).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The modules in the order of the ```` ```modules ```` block of ARCHITECTURE.md: the first
/// word of each line.
fn documented_order(architecture: &str) -> Vec<String> {
    let block = architecture
        .split("```modules\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```modules block");
    block
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Each top-level module of `src/` (but `main` and `lib`), with the text of its files.
fn modules(src: &Path) -> BTreeMap<String, Vec<(PathBuf, String)>> {
    let mut found: BTreeMap<String, Vec<(PathBuf, String)>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let first = relative.components().next().unwrap().as_os_str();
            let module = Path::new(first)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if module == "main" || module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            found.entry(module).or_default().push((path, text));
        }
    }
    found
}

/// The modules named after `crate::` in `text` (`use crate::{a, b}` counts both).
fn uses(text: &str) -> Vec<String> {
    let mut named = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    named.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            named.push(name);
        }
    }
    named
}

/// Every use of a module listed after the user: "file uses `crate::later`".
fn violations(order: &[String], modules: &BTreeMap<String, Vec<(PathBuf, String)>>) -> Vec<String> {
    let rank = |name: &str| order.iter().position(|m| m == name);
    let mut found = Vec::new();
    for (module, files) in modules {
        let Some(own) = rank(module) else {
            found.push(format!(
                "module `{module}` is not in ARCHITECTURE.md's order"
            ));
            continue;
        };
        for (path, text) in files {
            for used in uses(text) {
                if rank(&used).is_some_and(|r| r > own) {
                    found.push(format!(
                        "{} uses `crate::{used}`, which comes after `{module}`",
                        path.display()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_uses_a_module_listed_after_it() {
    let architecture = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let order = documented_order(&architecture);
    let found = violations(&order, &modules(&root().join("src")));
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn lib_declares_every_module_in_the_documented_order() {
    let architecture = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let order = documented_order(&architecture);
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let declared: Vec<String> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect();
    assert_eq!(declared, order);
    let present: Vec<String> = modules(&root().join("src")).into_keys().collect();
    let mut listed = order.clone();
    listed.sort();
    assert_eq!(present, listed);
}

#[test]
fn the_check_finds_a_stage_that_imports_a_later_one() {
    let order: Vec<String> = ["outcome", "dispatch", "journal", "report"]
        .map(str::to_owned)
        .to_vec();
    let file = |module: &str, text: &str| {
        (
            module.to_owned(),
            vec![(PathBuf::from(format!("src/{module}.rs")), text.to_owned())],
        )
    };
    let fine = BTreeMap::from([
        file(
            "journal",
            "use crate::dispatch::{Gate, Record};\nuse crate::outcome::State;",
        ),
        file("report", "use crate::{journal, outcome::State};"),
    ]);
    assert_eq!(violations(&order, &fine), Vec::<String>::new());
    let cycle = BTreeMap::from([
        file("dispatch", "use crate::{config, journal::Recorder};"),
        file("journal", "fn f() -> crate::report::State { todo!() }"),
        file("extra", ""),
    ]);
    assert_eq!(
        violations(&order, &cycle),
        [
            "src/dispatch.rs uses `crate::journal`, which comes after `dispatch`",
            "module `extra` is not in ARCHITECTURE.md's order",
            "src/journal.rs uses `crate::report`, which comes after `journal`",
        ]
    );
}
