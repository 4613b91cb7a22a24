//! The `narrative_log_audit` injection (JEPSEN01): watches clarity's backlog on
//! `BULWARK_NARRATIVES` for `duration_s` (how many narratives waited, durably, while clarity
//! could not write, and for how long), waits up to `settle_s` for the backlog to drain, then
//! compares the audit chain with the narrative stream: every stored narrative's sequence must be
//! the `source_seq` of exactly one audit record (no gap, no duplicate), and `clarity.verify`
//! must find the chain intact.
//!
//! Narrated on `clarity.narrative.chaos_checker`: `narratives_buffered` (when a backlog lasted 2 s
//! or more: `context.max_backlog`, `context.longest_backlog_s`) and `narrative_log_checked`
//! (`context.gaps`, `context.duplicates`, `context.chain_ok`, `context.narratives`,
//! `context.records`, `context.drained`, and `context.out_of_order`: records appended after a
//! later narrative, as happens to the narratives a crashed clarity had fetched and not
//! acknowledged, redelivered after `clarity.ack_wait_s`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bulwark_common::{streams, subjects, time};
use serde_json::{Value, json};

use crate::target::Target;

/// A backlog that lasts this long is reported as buffering (clarity keeps up in milliseconds).
const BUFFERED_AFTER: Duration = Duration::from_secs(2);

async fn narrate(target: &Target, what: &str, why: &str, context: Value) {
    let body = json!({
        "who": "chaos_checker", "what": what, "when": time::now(), "where": "bulwark-chaos",
        "why": [why], "how": "BULWARK_NARRATIVES against BULWARK_AUDIT", "context": context,
    });
    if let Ok(ack) = target
        .js
        .publish(
            subjects::narrative("chaos_checker"),
            body.to_string().into(),
        )
        .await
    {
        let _ = ack.await;
    }
}

/// Gaps and duplicates: narrative sequences in `first..=last` that no record names, and
/// sequences named by more than one record.
pub fn gaps_and_duplicates(first: u64, last: u64, source_seqs: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let mut count: HashMap<u64, u64> = HashMap::new();
    for s in source_seqs {
        *count.entry(*s).or_default() += 1;
    }
    let gaps = (first..=last)
        .filter(|s| !count.contains_key(s))
        .collect::<Vec<_>>();
    let mut dups: Vec<u64> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    dups.sort_unstable();
    (gaps, dups)
}

/// Runs the watch and the check; returns the figures.
pub async fn run(target: &Target, duration_s: f64, settle_s: f64) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut max_backlog = 0u64;
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs_f64(duration_s) {
        if let Ok((backlog, _, _)) = target.narrative_log().await {
            max_backlog = max_backlog.max(backlog);
            if backlog > 0 {
                let s = *since.get_or_insert_with(Instant::now);
                longest = longest.max(s.elapsed());
            } else {
                since = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if longest >= BUFFERED_AFTER {
        narrate(
            target,
            "narratives_buffered",
            "narratives waited durably in BULWARK_NARRATIVES while clarity could not append them",
            json!({"max_backlog": max_backlog, "longest_backlog_s": longest.as_secs_f64()}),
        )
        .await;
    }
    // Drain, then compare.
    let deadline = Instant::now() + Duration::from_secs_f64(settle_s);
    let mut drained = false;
    let mut report = Value::Null;
    while Instant::now() < deadline {
        if let Ok((0, _, r)) = target.narrative_log().await {
            drained = true;
            report = r;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut narratives = target.js.get_stream(streams::NARRATIVES_STREAM).await?;
    let n_state = narratives.info().await?.state.clone();
    let mut audit = target.js.get_stream(streams::AUDIT_STREAM).await?;
    let a_state = audit.info().await?.state.clone();
    let mut source_seqs = Vec::new();
    if a_state.messages > 0 {
        for seq in a_state.first_sequence..=a_state.last_sequence {
            if let Ok(msg) = audit.get_raw_message(seq).await
                && let Ok(record) = serde_json::from_slice::<Value>(&msg.payload)
                && let Some(s) = record["source_seq"].as_u64()
            {
                source_seqs.push(s);
            }
        }
    }
    // Narratives stored after the drain are not expected in the chain yet.
    let last = source_seqs
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .min(n_state.last_sequence);
    let (gaps, dups) = gaps_and_duplicates(n_state.first_sequence, last, &source_seqs);
    let chain_ok = report["ok"] == true;
    // Records appended after a later narrative (a redelivered one, after a crash).
    let mut high = 0u64;
    let mut out_of_order = 0u64;
    for s in &source_seqs {
        if *s < high {
            out_of_order += 1;
        }
        high = high.max(*s);
    }
    let context = json!({
        "drained": drained, "chain_ok": chain_ok,
        "gaps": gaps.len(), "duplicates": dups.len(), "out_of_order": out_of_order,
        "gap_examples": gaps.iter().take(10).collect::<Vec<_>>(),
        "duplicate_examples": dups.iter().take(10).collect::<Vec<_>>(),
        "narratives": n_state.messages, "records": source_seqs.len(),
        "first_bad_seq": report["first_bad_seq"],
    });
    narrate(
        target,
        "narrative_log_checked",
        "every stored narrative appended to the audit chain exactly once",
        context.clone(),
    )
    .await;
    Ok(json!({
        "max_backlog": max_backlog,
        "longest_backlog_s": longest.as_secs_f64(),
        "check": context,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_duplicates_are_found() {
        assert_eq!(
            gaps_and_duplicates(1, 5, &[1, 2, 3, 4, 5]),
            (vec![], vec![])
        );
        assert_eq!(
            gaps_and_duplicates(1, 5, &[1, 2, 2, 5]),
            (vec![3, 4], vec![2])
        );
    }
}
