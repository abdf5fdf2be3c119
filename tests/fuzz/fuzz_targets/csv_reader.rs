//! Arbitrary bytes as a recipient CSV: `parse_reader` must not panic, and what it returns must
//! hold the invariants the rest of the pipeline relies on.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailer::recipients::parse_reader;

fuzz_target!(|data: &[u8]| {
    let list = parse_reader(Path::new("r.csv"), data, &HashSet::new());

    // key -> line of the row kept for it
    let mut kept: HashMap<&str, u64> = HashMap::new();
    for recipient in list.recipients.iter().chain(&list.suppressed) {
        let line = recipient.line;
        let key: &str = &recipient.address.key;
        // The key is the normalised address: exactly one '@', not at either end.
        assert_eq!(
            key.matches('@').count(),
            1,
            "line {line}: key {key:?} must hold exactly one '@'"
        );
        assert!(
            !key.starts_with('@') && !key.ends_with('@'),
            "line {line}: key {key:?} has an '@' at one end"
        );
        let address = &recipient.address;
        assert_eq!(
            format!("{}@{}", address.local(), address.domain()),
            key,
            "line {line}: local() and domain() do not make up the key"
        );
        assert_eq!(
            address.to_lettre().to_string(),
            key,
            "line {line}: the lettre address differs from the key"
        );
        // The name reaches the To header.
        if let Some(name) = recipient.name(&list.columns) {
            assert!(
                !name.contains(['\r', '\n']),
                "line {line}: name {name:?} holds a line break"
            );
        }
        // Line 1 is the header; a lone CR ends a line too (README.md, finding 3, fixed).
        assert!(line >= 2, "recipient on line {line}");
        // Deduplication: one recipient per key.
        if let Some(first) = kept.insert(key, line) {
            panic!("key {key:?} kept twice, on lines {first} and {line}");
        }
    }

    // Every duplicate refers back to an earlier row that was kept, with the same key.
    for &(line, first) in &list.duplicates {
        assert!(first < line, "duplicate ({line}, {first}) points forward");
        assert!(
            kept.values().any(|&l| l == first),
            "duplicate ({line}, {first}): no kept row on line {first}"
        );
    }

    for problem in &list.problems.0 {
        assert!(
            matches!(problem.line, Some(line) if line >= 1),
            "problem without a (1-based) line number: {problem:?}"
        );
    }
});
