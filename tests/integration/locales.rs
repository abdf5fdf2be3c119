//! Locale negotiation as the operator sees it: which folder each recipient's `locale` gets,
//! and how `check`, `plan`, `plan --json` and the preview gallery count the recipients no
//! folder serves as asked.

use std::collections::HashMap;

use crate::campaign::Campaign;
use crate::parse;

/// The example with `pt-PT` and `zh-Hant` folders too, and rows asking for neighbours of them.
fn regional() -> Campaign {
    Campaign::example()
        .file(
            "locales/pt-PT/main.ftl",
            "greeting = Olá { $name },\nbody = Vamos actualizar os termos do serviço.\n",
        )
        .file(
            "locales/zh-Hant/main.ftl",
            "greeting = { $name } 您好，\nbody = 我們將更新服務條款。\n",
        )
        .rows(
            [
                "br1@example.com,Ana,pt-BR,Pro",
                "br2@example.com,Bia,pt_BR,Pro",
                "pt@example.com,Rui,pt,Pro",
                "ptu@example.com,Eva,pt-PT-u-ca-gregory,Pro",
                "tw@example.com,Mei,zh-TW,Pro",
                "twu@example.com,Lin,zh_Hant_TW,Pro",
                "hk@example.com,Kit,zh-HK,Pro",
                "cn@example.com,Wei,zh-CN,Pro",
                "k1@example.com,Worf,x-klingon,Pro",
                "k2@example.com,Kor,x-klingon,Pro",
                "k3@example.com,Kang,x-klingon,Pro",
                "us@example.com,Sam,EN_us,Pro",
                "ca@example.com,Luc,fr-ca,Pro",
                "at@example.com,Udo,de-AT,Pro",
                "esc@example.com,Eve,\"zz\u{1b}[2J\",Pro",
                "none@example.com,Nat,,Pro",
            ]
            .map(str::to_owned),
        )
}

/// The lines every command that reports them prints (before `recipients.csv: warning: `).
const EXPECTED: [&str; 6] = [
    "3 recipients asked for `x-klingon`; no locale folder serves it, so they get `en`",
    // Counted as written in the list, so that the rows can be found.
    "1 recipient asked for `pt-BR`; they get `pt-PT`, the nearest locale folder",
    "1 recipient asked for `pt_BR`; they get `pt-PT`, the nearest locale folder",
    "1 recipient asked for `pt`; they get `pt-PT`, the nearest locale folder",
    "1 recipient asked for `zh-CN`; no locale folder serves it, so they get `en`",
    "1 recipient asked for `zz\\x1b[2J`; no locale folder serves it, so they get `en`",
];

/// Requests served as asked, or by a more general folder: nothing is said about them.
const SILENT: [&str; 8] = [
    "`pt-PT-u-ca-gregory`",
    "`zh-TW`",
    "`zh_Hant_TW`",
    "`zh-HK`",
    "`EN_us`",
    "`fr-ca`",
    "`de-AT`",
    "asked for ``",
];

#[test]
fn check_counts_the_recipients_no_folder_serves_as_asked() {
    let run = regional().run("check", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    for line in EXPECTED {
        assert!(
            run.stdout
                .contains(&format!("recipients.csv: warning: {line}\n")),
            "{line}\n{}",
            run.stdout
        );
    }
    for quiet in SILENT {
        assert!(!run.stdout.contains(quiet), "{quiet}\n{}", run.stdout);
    }
    assert!(
        !run.stdout.contains('\u{1b}'),
        "a cell's escape reached the terminal"
    );
    // Most recipients first, then by tag.
    let at = |line: &str| run.stdout.find(line).unwrap();
    assert!(at(EXPECTED[0]) < at(EXPECTED[3]) && at(EXPECTED[3]) < at(EXPECTED[1]));
}

#[test]
fn plan_and_plan_json_carry_the_counts() {
    let campaign = regional();
    let run = campaign.run("plan", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    for line in EXPECTED {
        assert!(run.stdout.contains(line), "{line}\n{}", run.stdout);
    }
    let json = campaign.run("plan", &["--json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let plan: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let requests = &plan["locale_requests"];
    let listed: Vec<(String, String, String, u64)> = requests["listed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["requested"].as_str().unwrap().to_owned(),
                m["served"].as_str().unwrap().to_owned(),
                m["fit"].as_str().unwrap().to_owned(),
                m["recipients"].as_u64().unwrap(),
            )
        })
        .collect();
    let entry = |requested: &str, served: &str, fit: &str, count: u64| {
        (
            requested.to_owned(),
            served.to_owned(),
            fit.to_owned(),
            count,
        )
    };
    assert_eq!(
        listed,
        vec![
            entry("x-klingon", "en", "unserved", 3),
            entry("pt", "pt-PT", "near", 1),
            entry("pt-BR", "pt-PT", "near", 1),
            entry("pt_BR", "pt-PT", "near", 1),
            entry("zh-CN", "en", "unserved", 1),
            entry("zz\\x1b[2J", "en", "unserved", 1),
        ]
    );
    assert_eq!(requests["more_recipients"], 0);
    assert!(plan["warnings"].as_u64().unwrap() >= 6, "{plan}");
}

#[test]
fn the_gallery_lists_the_locales_not_served_as_asked() {
    let campaign = regional();
    let out = campaign.dir().join("preview");
    let run = campaign.run("preview", &["--out", out.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    let summary =
        &page[page.find("id=\"summary\"").unwrap()..page.find("class=\"locale\"").unwrap()];
    assert!(
        summary.contains("<h4>Locales not served as asked</h4>"),
        "{summary}"
    );
    for line in EXPECTED {
        assert!(
            summary.contains(&format!("<li>{line}</li>")),
            "{line}\n{summary}"
        );
    }
    // The pt-BR row's sample is in the pt-PT section, the zh-TW row's in zh-Hant's.
    assert!(out.join("pt-PT/line-000002.eml").exists());
    assert!(out.join("zh-Hant/line-000006.eml").exists());
}

#[test]
fn a_send_gives_each_recipient_the_folder_negotiated_for_them() {
    let campaign = regional();
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let mut texts: HashMap<String, String> = HashMap::new();
    for entry in std::fs::read_dir(campaign.dir().join("outbox")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let message = parse(&bytes);
        let to = message
            .to()
            .unwrap()
            .first()
            .unwrap()
            .address()
            .unwrap()
            .to_owned();
        texts.insert(to, message.body_text(0).unwrap().replace("\r\n", "\n"));
    }
    assert_eq!(texts.len(), 16);
    let says = |address: &str, words: &str| {
        let text = &texts[address];
        assert!(text.contains(words), "{address}: {text}");
    };
    says("br1@example.com", "Olá Ana,\n\nVamos actualizar");
    says("br2@example.com", "Olá Bia,");
    says("pt@example.com", "Olá Rui,");
    says("ptu@example.com", "Olá Eva,");
    // Ids pt-PT does not translate come from its chain: pt-PT → en.
    says("br1@example.com", "Your current plan: Pro.");
    says("tw@example.com", "Mei 您好，\n");
    says("twu@example.com", "Lin 您好，");
    says("hk@example.com", "Kit 您好，");
    says("cn@example.com", "Hello Wei,");
    says("k1@example.com", "Hello Worf,");
    says("us@example.com", "Hello Sam,");
    says("ca@example.com", "Allô Luc,");
    says("esc@example.com", "Hello Eve,");
    says("none@example.com", "Hello Nat,");
}
