//! The review records of a journal: the plans made (what an approval refers to) and the
//! canary stage, kept apart from the recipients.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context as _;
use rusqlite::{OptionalExtension as _, params};

use super::Journal;

/// Inputs the journal knows by their fingerprint: from a plan, or a run's frozen inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub fingerprint: String,
    pub inputs: BTreeMap<String, String>,
    /// When the plan was made or the run first froze them (ms).
    pub at: i64,
    /// `plan` or `run`.
    pub source: &'static str,
    /// The suppressed keys a plan saw (none for a run's inputs).
    pub suppression: Option<HashSet<String>>,
}

/// One canary message's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryOutcome {
    pub address: String,
    pub line: u64,
    pub locale: String,
    /// A state name (`sent`, `deferred`, `failed`, …).
    pub state: String,
    pub attempts: u32,
    pub detail: String,
}

impl Journal {
    /// Records a plan: its fingerprint, the inputs it covers, the plan itself (JSON) and the
    /// suppressed keys it saw. Planning the same inputs again refreshes the record.
    pub fn record_plan(
        &self,
        fingerprint: &str,
        inputs: &BTreeMap<String, String>,
        plan: &str,
        suppression: &HashSet<String>,
    ) -> anyhow::Result<()> {
        let mut keys: Vec<&str> = suppression.iter().map(String::as_str).collect();
        keys.sort_unstable();
        self.conn.execute(
            "INSERT INTO plans (fingerprint, inputs, plan, suppression, made_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (fingerprint) DO UPDATE SET plan = excluded.plan, made_at = excluded.made_at",
            params![
                fingerprint,
                serde_json::to_string(inputs)?,
                plan,
                keys.join("\n"),
                crate::clock::now_millis()
            ],
        )?;
        Ok(())
    }

    /// The latest plan whose fingerprint starts with `prefix` (lower-case hex), or else a
    /// run's frozen inputs with such a fingerprint.
    pub fn known_inputs(&self, prefix: &str) -> anyhow::Result<Option<Known>> {
        // Hex digits only (checked by the caller), so the pattern has no wildcard in it.
        let pattern = format!("{prefix}%");
        let found = |sql: &str, source: &'static str| -> anyhow::Result<Option<Known>> {
            let row: Option<(String, String, i64, Option<String>)> = self
                .conn
                .query_row(sql, params![pattern], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            row.map(|(fingerprint, inputs, at, suppression)| {
                Ok(Known {
                    fingerprint,
                    inputs: serde_json::from_str(&inputs)
                        .context("the journal's recorded inputs are unreadable")?,
                    at,
                    source,
                    suppression: suppression.map(|keys| {
                        keys.split('\n')
                            .filter(|k| !k.is_empty())
                            .map(str::to_owned)
                            .collect()
                    }),
                })
            })
            .transpose()
        };
        if let Some(plan) = found(
            "SELECT fingerprint, inputs, made_at, suppression FROM plans WHERE fingerprint LIKE ?1
             ORDER BY made_at DESC LIMIT 1",
            "plan",
        )? {
            return Ok(Some(plan));
        }
        found(
            "SELECT fingerprint, inputs, created_at, NULL FROM runs WHERE fingerprint LIKE ?1
             ORDER BY created_at DESC LIMIT 1",
            "run",
        )
    }

    /// The canary addresses already accepted (`sent`) for inputs `fingerprint`.
    pub fn canary_sent(&self, fingerprint: &str) -> anyhow::Result<HashSet<String>> {
        let mut statement = self
            .conn
            .prepare("SELECT address FROM canary WHERE fingerprint = ?1 AND state = 'sent'")?;
        let rows = statement.query_map(params![fingerprint], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records canary outcomes for inputs `fingerprint`, in one transaction. A canary already
    /// `sent` keeps that state.
    pub fn record_canary(
        &mut self,
        fingerprint: &str,
        outcomes: &[CanaryOutcome],
    ) -> anyhow::Result<()> {
        let now = crate::clock::now_millis();
        let transaction = self.conn.transaction()?;
        for outcome in outcomes {
            transaction.execute(
                "INSERT INTO canary (fingerprint, address, line, locale, state, attempts, detail, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (fingerprint, address) DO UPDATE SET line = excluded.line,
                     locale = excluded.locale, state = excluded.state,
                     attempts = canary.attempts + excluded.attempts, detail = excluded.detail,
                     at = excluded.at
                 WHERE canary.state <> 'sent'",
                params![
                    fingerprint,
                    outcome.address,
                    i64::try_from(outcome.line).unwrap_or(i64::MAX),
                    outcome.locale,
                    outcome.state,
                    outcome.attempts,
                    outcome.detail,
                    now
                ],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::journal;
    use super::*;

    fn inputs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_plan_is_found_by_a_prefix_of_its_fingerprint() {
        let (_dir, journal) = journal();
        let first = inputs(&[("recipients", "aa")]);
        let suppressed = HashSet::from(["a@x.org".to_owned(), "b@y.org".to_owned()]);
        journal
            .record_plan("abcdef0123", &first, "{}", &suppressed)
            .unwrap();
        journal
            .record_plan(
                "abc9990000",
                &inputs(&[("recipients", "bb")]),
                "{}",
                &HashSet::new(),
            )
            .unwrap();
        let known = journal.known_inputs("abcdef").unwrap().unwrap();
        assert_eq!(
            (known.fingerprint.as_str(), &known.inputs, known.source),
            ("abcdef0123", &first, "plan")
        );
        assert_eq!(known.suppression, Some(suppressed));
        let empty = journal.known_inputs("abc999").unwrap().unwrap();
        assert_eq!(empty.suppression, Some(HashSet::new()));
        assert_eq!(journal.known_inputs("abcdee").unwrap(), None);
        // Frozen inputs of a run count too.
        journal
            .freeze_inputs("", "feed01", &inputs(&[("recipients", "cc")]), None)
            .unwrap();
        let run = journal.known_inputs("feed").unwrap().unwrap();
        assert_eq!((run.source, run.suppression), ("run", None));
    }

    #[test]
    fn a_canary_once_sent_stays_sent() {
        let (_dir, mut journal) = journal();
        let outcome = crate::journal::fixtures::canary;
        journal
            .record_canary(
                "fp",
                &[outcome("a@x.org", "sent"), outcome("b@x.org", "deferred")],
            )
            .unwrap();
        assert_eq!(
            journal.canary_sent("fp").unwrap(),
            HashSet::from(["a@x.org".to_owned()])
        );
        journal
            .record_canary(
                "fp",
                &[outcome("a@x.org", "failed"), outcome("b@x.org", "sent")],
            )
            .unwrap();
        assert_eq!(journal.canary_sent("fp").unwrap().len(), 2);
        assert!(journal.canary_sent("other").unwrap().is_empty());
    }
}
