//! Snapshots of one rendered message per locale of the example campaign, with the date fixed.
//! Message-IDs and MIME boundaries derive from the campaign and address, so they are stable.

use std::path::Path;
use std::time::{Duration, SystemTime};

#[test]
fn one_message_per_locale_of_the_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let loaded = mailer::pipeline::load(&path).unwrap().unwrap();
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let mut seen = std::collections::BTreeSet::new();
    for recipient in &loaded.list.recipients {
        let message = mailer::pipeline::prepare(&loaded, recipient, date).unwrap();
        if seen.insert(message.locale.clone()) {
            let text = String::from_utf8(message.bytes).unwrap();
            insta::assert_snapshot!(format!("example_{}", message.locale), text);
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["de", "en", "fr", "fr-CA"]
    );
}
