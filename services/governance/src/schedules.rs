//! Schedules (`[schedules.<name>]`, docs/actions.md#schedules): each submits its intent at the
//! times of its cron expression, through governance's own intake (tiers, alignment, review,
//! votes and the action param check all apply), as the configured actor.
//!
//! Every governance replica runs every schedule; a run's intent id is derived from the schedule
//! and the time (`sched-<name>-<unix seconds>`), so the intake's idempotency makes it one intent
//! however many replicas fire it. At start, a schedule whose `missed` is `run_once` submits its
//! most recent time (at or before now) unless that run's intent already exists.
//!
//! # Subjects
//! Produces: `clarity.narrative.governance` (`schedule_fired`, `schedule_failed`), besides what
//! the intake produces for the intent.

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use bulwark_common::api::ApiError;
use bulwark_common::cron::Cron;
use bulwark_common::intent::Decision;
use bulwark_common::narrative::Narrator;
use bulwark_common::schedule::{Missed, ScheduleConfig};

/// Runs schedule `name` until `shutdown`: `submit` goes through the intake, `exists` tells
/// whether an intent id is recorded. A finished record is kept `remembered_for` (the finished
/// intent retention; zero: for ever): a missed run older than that is not caught up, since its
/// record's absence no longer proves it never ran.
pub async fn run<S, SF, E, EF>(
    name: String,
    schedule: ScheduleConfig,
    narrator: Narrator,
    submit: S,
    exists: E,
    remembered_for: Duration,
    shutdown: CancellationToken,
) where
    S: Fn(Value) -> SF,
    SF: Future<Output = Result<Decision, ApiError>>,
    E: Fn(String) -> EF,
    EF: Future<Output = bool>,
{
    let cron = match schedule.validate(&name) {
        Ok(cron) => cron,
        Err(err) => {
            tracing::error!(schedule = %name, error = %err, "schedule not run");
            return;
        }
    };
    if let Some(slot) = catch_up(&cron, schedule.missed, Timestamp::now(), remembered_for)
        && !exists(ScheduleConfig::intent_id(&name, slot)).await
    {
        fire(
            &name,
            &schedule,
            slot,
            "run_once: its last time passed while no governance ran",
            &narrator,
            &submit,
        )
        .await;
    }
    let mut after = Timestamp::now();
    loop {
        let Some(slot) = next(&cron, after) else {
            tracing::warn!(schedule = %name, "the cron expression names no time in the next five years");
            return;
        };
        let wait = slot
            .as_millisecond()
            .saturating_sub(Timestamp::now().as_millisecond())
            .max(0);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())) => {}
        }
        fire(&name, &schedule, slot, "its time came", &narrator, &submit).await;
        after = slot;
    }
}

fn next(cron: &Cron, after: Timestamp) -> Option<Timestamp> {
    // A slow round never fires a past time twice, nor all the times it slept through.
    cron.next_after(after.max(Timestamp::now()))
}

/// The missed time a start may catch up: with `run_once`, the most recent time at or before
/// `now`, provided a finished record of it would still be kept (`remembered_for`, zero: for
/// ever), so that its absence means it never ran.
pub fn catch_up(
    cron: &Cron,
    missed: Missed,
    now: Timestamp,
    remembered_for: Duration,
) -> Option<Timestamp> {
    if missed != Missed::RunOnce {
        return None;
    }
    let slot = cron.prev_at_or_before(now)?;
    let age_ms = now.as_millisecond() - slot.as_millisecond();
    (remembered_for.is_zero() || age_ms < remembered_for.as_millis() as i64).then_some(slot)
}

async fn fire<S, SF>(
    name: &str,
    schedule: &ScheduleConfig,
    slot: Timestamp,
    why: &str,
    narrator: &Narrator,
    submit: &S,
) where
    S: Fn(Value) -> SF,
    SF: Future<Output = Result<Decision, ApiError>>,
{
    let body = schedule.submission(name, slot);
    let intent_id = ScheduleConfig::intent_id(name, slot);
    let slot_text = bulwark_common::time::format(slot);
    let n = match submit(body).await {
        Ok(decision) => narrator
            .narrative(
                "schedule_fired",
                "cron schedule, submitted through the intake",
            )
            .why(format!("schedule {name} ({}): {why}", schedule.cron))
            .why(format!(
                "intent {intent_id} is {}",
                decision.status.as_str()
            ))
            .intent(&intent_id, &intent_id)
            .context(
                json!({"schedule": name, "slot": slot_text, "intent_type": schedule.intent_type,
                            "actor": schedule.actor, "status": decision.status}),
            ),
        Err(err) => {
            tracing::warn!(schedule = name, slot = %slot_text, error = %err.message, "schedule run refused");
            narrator
                .narrative(
                    "schedule_failed",
                    "cron schedule, submitted through the intake",
                )
                .why(format!("schedule {name} ({}): {why}", schedule.cron))
                .why(format!(
                    "the intake refused it: {} ({})",
                    err.message, err.code
                ))
                .context(
                    json!({"schedule": name, "slot": slot_text, "intent_id": intent_id,
                                "code": err.code, "status": err.status}),
                )
        }
    };
    narrator.publish(n).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_time_older_than_the_record_retention_is_not_caught_up() {
        let yearly = Cron::parse("0 0 1 1 *").expect("cron");
        let week = Duration::from_secs(7 * 86_400);
        let jan3: Timestamp = "2026-01-03T00:00:00Z".parse().expect("ts");
        let dec6: Timestamp = "2026-12-06T00:00:00Z".parse().expect("ts");
        let jan1: Timestamp = "2026-01-01T00:00:00Z".parse().expect("ts");
        assert_eq!(catch_up(&yearly, Missed::RunOnce, jan3, week), Some(jan1));
        assert_eq!(
            catch_up(&yearly, Missed::RunOnce, dec6, week),
            None,
            "its record would be gone: no proof it never ran"
        );
        assert_eq!(
            catch_up(&yearly, Missed::RunOnce, dec6, Duration::ZERO),
            Some(jan1),
            "records kept for ever"
        );
        assert_eq!(catch_up(&yearly, Missed::Skip, jan3, week), None);
    }
}
