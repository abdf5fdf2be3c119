//! Deliverability (issue 7): what the messages carry besides the campaign's words.

use crate::campaign::Campaign;
use crate::sink::Sink;

#[test]
fn an_html_only_campaign_delivers_a_text_part_with_the_translated_words() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@example.com,Ann,fr,Pro")
        .row("bob@example.com,Bob,de,Team");
    let path = campaign.write();
    std::fs::remove_file(campaign.dir().join("templates/text.hbs")).unwrap();
    let run = crate::campaign::mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 2);
    for t in &transactions {
        let raw = String::from_utf8_lossy(&t.data);
        assert!(
            raw.contains("multipart/alternative") && raw.contains("Content-Type: text/plain"),
            "a real text/plain part, not one a reader would derive: {raw}"
        );
        let message = crate::parse(&t.data);
        assert_eq!(message.text_body_count(), 1, "one text part");
        assert_eq!(message.html_body_count(), 1, "and the HTML");
        let text = message.body_text(0).unwrap();
        let html = message.body_html(0).unwrap();
        assert!(!html.is_empty());
        assert!(!text.contains('<'), "no markup in the text part: {text}");
        // What the translation of each recipient's locale says (locales/fr, locales/de).
        let expected: &[&str] = if t.rcpt_to[0] == "ann@example.com" {
            &["Bonjour Ann", "Votre formule actuelle : Pro."]
        } else {
            &["Hallo Bob", "Team"]
        };
        for words in expected {
            assert!(text.contains(words), "{words:?} in {text}");
        }
    }
}
