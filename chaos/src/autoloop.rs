//! The autonomous chaos loop behind `bulwark chaos loop`, as pure parts the CLI drives:
//!
//! - [`Schedule`]: the daily slots (default the seed's 02:00, 08:00, 12:00, 18:00, 23:00 at
//!   severities 2, 3, 4, 5, 5) and [`Schedule::next`], which slot comes next at a given time.
//! - [`Learning`]: the persisted learning record per scenario (runs, passes, failures, mean
//!   recovery time, difficulty 1-10), read from and written atomically to
//!   `<state dir>/learning.json`.
//! - [`pick`]: the seed's scoring (+10 untested for more than a day or never, +5 failed before,
//!   +3 difficulty matching the slot's severity), the longest untested first among equals.
//! - [`at_difficulty`]: the run plan at a difficulty: rates, counts, concurrency, durations and
//!   fractions killed really grow with it (the seed's level changed nothing).
//! - [`missing_safeguards`] and [`playbook_skeleton`]: when a safeguard that must fire did not,
//!   a Markdown report with the evidence and a `.rhai` skeleton for a person to review. Nothing
//!   is ever enabled: the skeleton is written to the report directory, never to `playbooks/`.
//!
//! No NATS here; the CLI (`services/bulwark/src/chaos.rs`) runs the scenarios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runner::{ScenarioResult, Verdict};
use crate::scenario::{AtLeastOne, Injection, Scenario, Seconds, Share};

/// One daily slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Hour, 0-23 (local time).
    pub hour: u8,
    /// Minute, 0-59.
    pub minute: u8,
    /// Severity of the slot, 1-5.
    pub severity: u8,
}

impl Slot {
    fn minute_of_day(self) -> u32 {
        u32::from(self.hour) * 60 + u32::from(self.minute)
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}={}", self.hour, self.minute, self.severity)
    }
}

/// The daily slots, sorted by time of day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The slots.
    pub slots: Vec<Slot>,
}

impl Default for Schedule {
    /// The seed's: 02:00, 08:00, 12:00, 18:00, 23:00 at severities 2, 3, 4, 5, 5.
    fn default() -> Self {
        let slot = |hour, severity| Slot {
            hour,
            minute: 0,
            severity,
        };
        Schedule {
            slots: vec![
                slot(2, 2),
                slot(8, 3),
                slot(12, 4),
                slot(18, 5),
                slot(23, 5),
            ],
        }
    }
}

/// When the next slot runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// The slot.
    pub slot: Slot,
    /// Its index in the schedule.
    pub index: usize,
    /// Seconds from the given time until it starts (0 when it starts now).
    pub wait_s: u64,
}

impl Schedule {
    /// Parses `"02:00=2,08:00=3"` (time of day = severity); the default when `text` is empty.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        if text.trim().is_empty() {
            return Ok(Schedule::default());
        }
        let mut slots = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let (time, sev) = part
                .split_once('=')
                .ok_or_else(|| format!("slot {part:?}: expected HH:MM=SEVERITY"))?;
            let (h, m) = time
                .split_once(':')
                .ok_or_else(|| format!("slot {part:?}: expected HH:MM=SEVERITY"))?;
            let hour: u8 = h
                .trim()
                .parse()
                .ok()
                .filter(|h| *h < 24)
                .ok_or_else(|| format!("slot {part:?}: hour must be 0-23"))?;
            let minute: u8 = m
                .trim()
                .parse()
                .ok()
                .filter(|m| *m < 60)
                .ok_or_else(|| format!("slot {part:?}: minute must be 0-59"))?;
            let severity: u8 = sev
                .trim()
                .parse()
                .ok()
                .filter(|s| (1..=5).contains(s))
                .ok_or_else(|| format!("slot {part:?}: severity must be 1-5"))?;
            slots.push(Slot {
                hour,
                minute,
                severity,
            });
        }
        slots.sort_by_key(|s| s.minute_of_day());
        if slots
            .windows(2)
            .any(|w| w[0].minute_of_day() == w[1].minute_of_day())
        {
            return Err("two slots at the same time".into());
        }
        Ok(Schedule { slots })
    }

    /// The slot due at or after `now` (a local time of day), wrapping to tomorrow's first.
    pub fn next(&self, now: jiff::civil::Time) -> Option<Next> {
        let now_s = u64::from(now.hour() as u8) * 3600
            + u64::from(now.minute() as u8) * 60
            + u64::from(now.second() as u8);
        let first = *self.slots.first()?;
        let (index, slot, start_s) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, *s, u64::from(s.minute_of_day()) * 60))
            .find(|(_, _, start)| *start >= now_s)
            .unwrap_or((0, first, u64::from(first.minute_of_day()) * 60 + 86_400));
        Some(Next {
            slot,
            index,
            wait_s: start_s - now_s,
        })
    }
}

/// The lowest and highest difficulty.
pub const DIFFICULTY_MIN: u8 = 1;
/// The highest difficulty.
pub const DIFFICULTY_MAX: u8 = 10;
/// Passes in a row that raise the difficulty by one.
pub const PASSES_TO_ESCALATE: u64 = 3;

/// What the loop learned about one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Runs judged (PASS or FAIL; INCONCLUSIVE runs are counted apart).
    pub runs: u64,
    /// Passes.
    pub passes: u64,
    /// Failures.
    pub failures: u64,
    /// Inconclusive runs (they change nothing else).
    #[serde(default)]
    pub inconclusive: u64,
    /// Passes since the last failure or escalation.
    pub passes_in_a_row: u64,
    /// Mean seconds to recover (steady state back after the method), over the runs that did.
    pub mean_recovery_s: Option<f64>,
    /// Runs in the mean.
    #[serde(default)]
    pub recovery_samples: u64,
    /// Difficulty 1-10: the run plan's parameters grow with it ([`at_difficulty`]).
    pub difficulty: u8,
    /// When it last ran (RFC 3339), absent if never.
    pub last_run: Option<String>,
    /// Its last verdict.
    pub last_verdict: Option<String>,
    /// Safeguards that did not fire, with the times they were missed.
    #[serde(default)]
    pub missed_safeguards: BTreeMap<String, u64>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            runs: 0,
            passes: 0,
            failures: 0,
            inconclusive: 0,
            passes_in_a_row: 0,
            mean_recovery_s: None,
            recovery_samples: 0,
            difficulty: DIFFICULTY_MIN,
            last_run: None,
            last_verdict: None,
            missed_safeguards: BTreeMap::new(),
        }
    }
}

/// A difficulty change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Up after sustained passes.
    Escalated {
        /// Before.
        from: u8,
        /// After.
        to: u8,
    },
    /// Down after a failure.
    Lowered {
        /// Before.
        from: u8,
        /// After.
        to: u8,
    },
}

impl Record {
    /// Counts one run: a pass, a failure or an inconclusive run (`recovery_s` when the steady
    /// state came back). [`PASSES_TO_ESCALATE`] passes in a row raise the difficulty by one
    /// (up to 10) and start the count again; a failure lowers it by one (down to 1).
    pub fn record(
        &mut self,
        verdict: Verdict,
        recovery_s: Option<f64>,
        missed: &[String],
        at: &str,
    ) -> Option<Change> {
        self.last_run = Some(at.to_owned());
        self.last_verdict = Some(verdict.as_str().to_owned());
        if verdict == Verdict::Inconclusive {
            self.inconclusive += 1;
            return None;
        }
        self.runs += 1;
        if let Some(r) = recovery_s {
            let n = self.recovery_samples as f64;
            let mean = self.mean_recovery_s.unwrap_or(0.0);
            self.mean_recovery_s = Some((mean * n + r) / (n + 1.0));
            self.recovery_samples += 1;
        }
        for m in missed {
            *self.missed_safeguards.entry(m.clone()).or_default() += 1;
        }
        let from = self.difficulty;
        if verdict == Verdict::Pass {
            self.passes += 1;
            self.passes_in_a_row += 1;
            if self.passes_in_a_row >= PASSES_TO_ESCALATE && self.difficulty < DIFFICULTY_MAX {
                self.difficulty += 1;
                self.passes_in_a_row = 0;
                return Some(Change::Escalated {
                    from,
                    to: self.difficulty,
                });
            }
            None
        } else {
            self.failures += 1;
            self.passes_in_a_row = 0;
            if self.difficulty > DIFFICULTY_MIN {
                self.difficulty -= 1;
                return Some(Change::Lowered {
                    from,
                    to: self.difficulty,
                });
            }
            None
        }
    }

    /// The difficulty on the severity scale (1-5): difficulty 1-2 is 1, ..., 9-10 is 5.
    pub fn difficulty_band(&self) -> u8 {
        self.difficulty
            .clamp(DIFFICULTY_MIN, DIFFICULTY_MAX)
            .div_ceil(2)
    }
}

/// The learning record of every scenario, `<state dir>/learning.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Learning {
    /// Per scenario id.
    pub scenarios: BTreeMap<String, Record>,
}

impl Learning {
    /// The file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("learning.json")
    }

    /// Reads it (an empty record when the file does not exist).
    pub fn load(state_dir: &Path) -> anyhow::Result<Learning> {
        let path = Learning::path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Learning::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Writes it atomically (a temporary file in the same directory, renamed over the old).
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(state_dir)?;
        let path = Learning::path(state_dir);
        let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        std::io::Write::write_all(&mut tmp, b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.error))?;
        Ok(path)
    }

    /// The record of `id` (a fresh one if it never ran).
    pub fn get(&self, id: &str) -> Record {
        self.scenarios.get(id).cloned().unwrap_or_default()
    }

    /// Counts `result` (see [`Record::record`]).
    pub fn record(&mut self, result: &ScenarioResult, at: &str) -> Option<Change> {
        let missed: Vec<String> = missing_safeguards(result)
            .into_iter()
            .map(|m| m.safeguard)
            .collect();
        self.scenarios.entry(result.id.clone()).or_default().record(
            result.verdict,
            result.scenario.recovery_s,
            &missed,
            at,
        )
    }
}

/// One scenario's score for a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The scenario id.
    pub id: String,
    /// Its score.
    pub score: u32,
    /// Why, in words.
    pub why: Vec<&'static str>,
    /// Seconds since it last ran (`None`: never).
    pub age_s: Option<i64>,
}

/// Scores every scenario for a slot of `severity` at `now` (the seed's scoring): +10 when it
/// never ran or last ran more than a day ago, +5 when it ever failed, +3 when its difficulty
/// band ([`Record::difficulty_band`]) equals the slot's severity. Sorted best first; among
/// equal scores the longest untested (never run first), then by id.
pub fn score(ids: &[&str], learning: &Learning, severity: u8, now: jiff::Timestamp) -> Vec<Scored> {
    let mut out: Vec<Scored> = ids
        .iter()
        .map(|id| {
            let r = learning.get(id);
            let age_s = r
                .last_run
                .as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| now.as_second() - t.as_second());
            let mut score = 0;
            let mut why = Vec::new();
            if age_s.is_none_or(|a| a > 86_400) {
                score += 10;
                why.push(if age_s.is_none() {
                    "never run"
                } else {
                    "untested for more than a day"
                });
            }
            if r.failures > 0 {
                score += 5;
                why.push("failed before");
            }
            if r.difficulty_band() == severity {
                score += 3;
                why.push("difficulty matches the slot");
            }
            Scored {
                id: (*id).to_owned(),
                score,
                why,
                age_s,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then_with(|| match (a.age_s, b.age_s) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => y.cmp(&x),
            })
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

/// The `top` best scored ids (the seed ran 3 per slot).
pub fn pick(
    ids: &[&str],
    learning: &Learning,
    severity: u8,
    now: jiff::Timestamp,
    top: usize,
) -> Vec<Scored> {
    let mut s = score(ids, learning, severity, now);
    s.truncate(top);
    s
}

/// How much harder difficulty `d` makes a scenario: 1.0 at 1, +25 % per level (3.25 at 10).
pub fn intensity(d: u8) -> f64 {
    1.0 + 0.25 * f64::from(d.clamp(DIFFICULTY_MIN, DIFFICULTY_MAX) - 1)
}

/// `s` as the loop runs it at difficulty `d`: in the method (the control keeps its normal load)
/// event, intent, query and review rates (the ramp's too), intent counts and concurrency are
/// multiplied by [`intensity`]; scheduler pauses and service or server outages (random ones
/// too) last that much longer; the
/// fraction of workers killed grows by it (at most all of them) and the kills come that much
/// closer together. Cascades keep their shape (the checker verifies it exactly). Expectations
/// keep their limits: harder runs must still meet them.
pub fn at_difficulty(s: &Scenario, d: u8) -> Scenario {
    let k = intensity(d);
    let mut out = s.clone();
    let n = |x: AtLeastOne| AtLeastOne(((x.0 as f64) * k).round().max(1.0) as u64);
    let t = |x: Seconds| Seconds(x.0 * k);
    for i in &mut out.method {
        match i {
            Injection::PublishEvents { rate_per_s, .. } => *rate_per_s = n(*rate_per_s),
            Injection::SubmitIntents {
                count,
                rate_per_s,
                concurrency,
                ..
            } => {
                *count = count.map(n);
                *rate_per_s = rate_per_s.map(n);
                *concurrency = n(*concurrency);
            }
            Injection::PauseScheduler { duration_s, .. } => *duration_s = t(*duration_s),
            Injection::KillWorkers {
                fraction, over_s, ..
            } => {
                *fraction = Share((fraction.0 * k).min(1.0));
                *over_s = Seconds(over_s.0 / k);
            }
            Injection::RestartService { down_s, .. } | Injection::RestartNats { down_s, .. } => {
                *down_s = t(*down_s)
            }
            Injection::ResourceSiege {
                cpu_threads,
                memory_mb,
                duration_s,
                ..
            } => {
                *cpu_threads = n(*cpu_threads);
                *memory_mb = ((*memory_mb as f64) * k).round() as u64;
                *duration_s = t(*duration_s);
            }
            Injection::Cascade { .. } => {}
            Injection::QueryStatus {
                rate_per_s,
                concurrency,
                ..
            } => {
                *rate_per_s = n(*rate_per_s);
                *concurrency = n(*concurrency);
            }
            Injection::ReviewIntents { rate_per_s, .. } => *rate_per_s = n(*rate_per_s),
            Injection::RandomOutage {
                min_down_s,
                max_down_s,
                ..
            } => {
                *min_down_s = t(*min_down_s);
                *max_down_s = t(*max_down_s);
            }
            Injection::RampIntents {
                from_per_s,
                to_per_s,
                ..
            } => {
                *from_per_s = n(*from_per_s);
                *to_per_s = n(*to_per_s);
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    out
}

/// A safeguard that was expected to fire and did not (or too late, or with the wrong value).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Missing {
    /// The safeguard's name in the scenario.
    pub safeguard: String,
    /// The subject it should have announced itself on.
    pub subject: String,
    /// What was seen, in words.
    pub detail: String,
    /// Times it fired.
    pub count: usize,
}

/// The safeguards of `result`'s scenario phase that had to fire and did not hold.
pub fn missing_safeguards(result: &ScenarioResult) -> Vec<Missing> {
    result
        .scenario
        .safeguards
        .iter()
        .filter(|g| g.expectation == "must_fire" && !g.ok)
        .map(|g| Missing {
            safeguard: g.safeguard.clone(),
            subject: g.subject.clone(),
            detail: g.detail.clone(),
            count: g.count,
        })
        .collect()
}

/// A file name part from a safeguard name: `[a-z0-9_]`.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_owned()
}

/// The Markdown "missing safeguard" report for `result` (`None` when nothing is missing).
pub fn missing_report(result: &ScenarioResult, difficulty: u8, command: &str) -> Option<String> {
    let missing = missing_safeguards(result);
    if missing.is_empty() {
        return None;
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Missing safeguard: {}\n", result.id);
    let _ = writeln!(
        md,
        "The chaos loop ran `{}` at difficulty {difficulty} (seed {}, started {}) and it FAILED \
         because a safeguard it expects did not fire as stated. Nothing has been enabled: the \
         playbook skeleton next to this report is for a person to review, finish and, if \
         wanted, copy into `playbooks/`.\n",
        result.id, result.seed, result.started_at
    );
    let _ = writeln!(
        md,
        "Replay: `{command}` runs the file as written (difficulty 1); the loop multiplied the \
         method's rates, counts, outages and kill fractions by {:.2}.\n",
        intensity(difficulty)
    );
    let _ = writeln!(md, "## What did not fire\n");
    let _ = writeln!(md, "| safeguard | subject | fired | detail |");
    let _ = writeln!(md, "|---|---|---|---|");
    for m in &missing {
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} |",
            m.safeguard,
            m.subject,
            m.count,
            m.detail.replace('|', "/")
        );
    }
    let _ = writeln!(md, "\n## Evidence\n");
    for r in &result.scenario.reasons {
        let _ = writeln!(md, "- FAIL because: {r}");
    }
    for e in &result.scenario.evidence {
        let _ = writeln!(md, "- {e}");
    }
    let c = &result.scenario.check;
    let _ = writeln!(
        md,
        "- checker: {}",
        serde_json::to_string(c).unwrap_or_default()
    );
    if let Some(r) = result.scenario.recovery_s {
        let _ = writeln!(md, "- recovery: {r:.1} s");
    }
    let _ = writeln!(md, "\n## Proposed playbooks (not enabled)\n");
    for m in &missing {
        let _ = writeln!(
            md,
            "- `missing_{}.rhai`: a skeleton for \"{}\"",
            slug(&m.safeguard),
            m.safeguard
        );
    }
    Some(md)
}

/// A playbook skeleton (the format of `docs/playbooks.md`) for a safeguard that did not fire.
/// It only looks (rates, readiness) and verifies; the repair is left for a person to write.
pub fn playbook_skeleton(scenario_id: &str, m: &Missing) -> String {
    let name = format!("missing_{}", slug(&m.safeguard));
    format!(
        r#"// {name}: SKELETON written by `bulwark chaos loop` for a person to review. NOT ENABLED.
// Scenario {scenario_id} expected the safeguard "{safeguard}" to announce itself on
// `{subject}`, and it did not: {detail}
// To use it: write the repair step, choose the triggers, check it with
// `bulwark playbook check <file>`, try it with `bulwark playbook run {name} --dry-run`,
// then copy it into playbooks/.

fn playbook() {{
    #{{
        name: "{name}",
        description: "TODO: repair what the missing safeguard \"{safeguard}\" should have caught",
        triggers: ["event.incident"],
        params: #{{ reason: "string" }},
        defaults: #{{ reason: "chaos loop: {scenario_id}" }},
        resource: "reason",
        slo_s: 60,
        cooldown_s: 300,
        steps: [
            #{{ run: "assess", title: "Look at the system" }},
            #{{ run: "repair", title: "TODO: the repair" }},
        ],
        verify: "recovered",
    }}
}}

fn assess(p) {{
    #{{ total_rate: total_event_rate(), readiness: readiness() }}
}}

fn repair(p) {{
    // TODO: act through the host API (docs/playbooks.md), e.g. limit_event_type(...),
    // open_breaker(...), shed_tasks(...), resume_scheduler(), respawn_worker(...).
    #{{ repaired: false }}
}}

fn recovered(p) {{
    // TODO: what must hold once repaired.
    verify(3, 5.0, || false)
}}
"#,
        safeguard = m.safeguard.replace('"', "'"),
        subject = m.subject,
        detail = m.detail.replace('\n', " "),
    )
}

/// Writes the missing-safeguard report and one skeleton per missing safeguard into `dir`
/// (never into `playbooks/`); returns the files written.
pub fn write_missing(
    dir: &Path,
    result: &ScenarioResult,
    difficulty: u8,
    command: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let Some(md) = missing_report(result, difficulty, command) else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let report = dir.join(format!("missing_safeguard_{}.md", result.id));
    std::fs::write(&report, md)?;
    written.push(report);
    for m in missing_safeguards(result) {
        let file = dir.join(format!("missing_{}.rhai", slug(&m.safeguard)));
        std::fs::write(&file, playbook_skeleton(&result.id, &m))?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario;

    fn t(h: i8, m: i8) -> jiff::civil::Time {
        jiff::civil::time(h, m, 0, 0)
    }

    #[test]
    fn the_schedule_picks_the_next_slot_on_a_fake_clock() {
        let s = Schedule::default();
        let n = s.next(t(1, 0)).expect("slot");
        assert_eq!((n.slot.hour, n.slot.severity, n.wait_s), (2, 2, 3600));
        let n = s.next(t(2, 0)).expect("slot");
        assert_eq!((n.index, n.wait_s), (0, 0), "a slot due now starts now");
        let n = s.next(t(2, 1)).expect("slot");
        assert_eq!(
            (n.slot.hour, n.slot.severity, n.wait_s),
            (8, 3, 6 * 3600 - 60)
        );
        let n = s.next(t(12, 30)).expect("slot");
        assert_eq!((n.slot.hour, n.slot.severity), (18, 5));
        let n = s.next(t(23, 30)).expect("slot");
        assert_eq!(
            (n.index, n.slot.hour, n.slot.severity, n.wait_s),
            (0, 2, 2, 30 * 60 + 2 * 3600),
            "after the last slot comes tomorrow's first"
        );
        let severities: Vec<u8> = s.slots.iter().map(|s| s.severity).collect();
        assert_eq!(severities, [2, 3, 4, 5, 5]);
    }

    #[test]
    fn a_schedule_parses_and_bad_ones_are_refused() {
        let s = Schedule::parse("18:30=4, 06:15=1").expect("parses");
        assert_eq!(s.slots[0].to_string(), "06:15=1");
        assert_eq!(s.next(t(7, 0)).expect("slot").slot.hour, 18);
        assert_eq!(Schedule::parse("").expect("default"), Schedule::default());
        for bad in ["25:00=1", "02:00=6", "02:00", "02:00=1,02:00=2", "x:00=1"] {
            assert!(Schedule::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    fn now() -> jiff::Timestamp {
        "2026-11-26T12:00:00Z".parse().expect("timestamp")
    }

    fn rec(last_run: Option<&str>, failures: u64, difficulty: u8) -> Record {
        Record {
            last_run: last_run.map(str::to_owned),
            failures,
            runs: failures + 1,
            difficulty,
            ..Record::default()
        }
    }

    #[test]
    fn the_scoring_orders_untested_then_failed_then_matching() {
        let mut l = Learning::default();
        let recent = "2026-11-26T10:00:00Z";
        let old = "2026-11-24T12:00:00Z";
        let older = "2026-11-20T12:00:00Z";
        l.scenarios
            .insert("recent_ok".into(), rec(Some(recent), 0, 1));
        l.scenarios
            .insert("recent_failed".into(), rec(Some(recent), 1, 1));
        l.scenarios
            .insert("recent_matching".into(), rec(Some(recent), 0, 7));
        l.scenarios.insert("old".into(), rec(Some(old), 0, 1));
        l.scenarios.insert("older".into(), rec(Some(older), 0, 1));
        l.scenarios
            .insert("old_failed".into(), rec(Some(old), 2, 1));
        let ids = [
            "recent_ok",
            "recent_failed",
            "recent_matching",
            "old",
            "older",
            "old_failed",
            "never",
        ];
        let s = score(&ids, &l, 4, now());
        let order: Vec<(&str, u32)> = s.iter().map(|x| (x.id.as_str(), x.score)).collect();
        assert_eq!(
            order,
            [
                ("old_failed", 15),
                ("never", 10),
                ("older", 10),
                ("old", 10),
                ("recent_failed", 5),
                ("recent_matching", 3),
                ("recent_ok", 0),
            ]
        );
        let top = pick(&ids, &l, 4, now(), 3);
        assert_eq!(top.len(), 3);
        assert_eq!(top[1].why, ["never run"]);
    }

    #[test]
    fn sustained_passes_escalate_and_a_failure_lowers() {
        let mut r = Record::default();
        let at = "2026-11-26T12:00:00Z";
        assert_eq!(r.record(Verdict::Pass, Some(4.0), &[], at), None);
        assert_eq!(r.record(Verdict::Pass, Some(6.0), &[], at), None);
        assert_eq!(
            r.record(Verdict::Pass, None, &[], at),
            Some(Change::Escalated { from: 1, to: 2 })
        );
        assert_eq!(r.mean_recovery_s, Some(5.0));
        assert_eq!(
            r.record(Verdict::Pass, None, &[], at),
            None,
            "the count restarts"
        );
        assert_eq!(r.record(Verdict::Inconclusive, None, &[], at), None);
        assert_eq!(
            r.record(Verdict::Fail, Some(11.0), &["breaker".into()], at),
            Some(Change::Lowered { from: 2, to: 1 })
        );
        assert_eq!(r.record(Verdict::Fail, None, &["breaker".into()], at), None);
        assert_eq!(r.difficulty, 1, "never below 1");
        assert_eq!((r.runs, r.passes, r.failures, r.inconclusive), (6, 4, 2, 1));
        assert_eq!(r.missed_safeguards["breaker"], 2);
        assert_eq!(r.mean_recovery_s, Some(7.0));
        r.difficulty = DIFFICULTY_MAX;
        for _ in 0..PASSES_TO_ESCALATE {
            assert_eq!(r.record(Verdict::Pass, None, &[], at), None);
        }
        assert_eq!(r.difficulty, DIFFICULTY_MAX, "never above 10");
    }

    fn dropout() -> Scenario {
        let dir = crate::scenarios_dir();
        scenario::load_file(&dir.join("L2_worker_dropout_chaos.toml"))
            .expect("loads")
            .scenario
    }

    fn kill(s: &Scenario) -> (f64, f64) {
        s.method
            .iter()
            .find_map(|i| match i {
                Injection::KillWorkers {
                    fraction, over_s, ..
                } => Some((fraction.0, over_s.0)),
                _ => None,
            })
            .expect("a kill")
    }

    fn rate(s: &Scenario) -> u64 {
        s.method
            .iter()
            .find_map(|i| match i {
                Injection::SubmitIntents { rate_per_s, .. } => rate_per_s.map(|r| r.0),
                _ => None,
            })
            .expect("a rate")
    }

    #[test]
    fn difficulty_changes_the_run_plan_and_a_failure_brings_it_back() {
        let base = dropout();
        let (f1, o1) = kill(&at_difficulty(&base, 1));
        assert_eq!((f1, o1), kill(&base), "difficulty 1 is the file as written");
        assert_eq!(rate(&at_difficulty(&base, 1)), rate(&base));
        let mut r = Record::default();
        for _ in 0..PASSES_TO_ESCALATE * 2 {
            r.record(Verdict::Pass, None, &[], "2026-11-26T12:00:00Z");
        }
        assert_eq!(r.difficulty, 3);
        let hard = at_difficulty(&base, r.difficulty);
        let (f3, o3) = kill(&hard);
        assert!(
            f3 > f1 && o3 < o1,
            "more workers killed, closer together: {f3} {o3}"
        );
        assert_eq!(rate(&hard), (rate(&base) as f64 * 1.5).round() as u64);
        assert_eq!(
            kill(&at_difficulty(&base, 10)).0,
            1.0,
            "at most every worker"
        );
        let control = |s: &Scenario| serde_json::to_string(&s.control.method).expect("json");
        assert_eq!(
            control(&hard),
            control(&base),
            "the control keeps normal load"
        );
        r.record(Verdict::Fail, None, &[], "2026-11-26T13:00:00Z");
        let (f2, _) = kill(&at_difficulty(&base, r.difficulty));
        assert!(f2 < f3 && f2 > f1, "a failure lowers the plan by one level");
    }

    #[test]
    fn the_learning_record_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        assert_eq!(Learning::load(&state).expect("empty"), Learning::default());
        let mut l = Learning::default();
        let mut r = rec(Some("2026-11-26T12:00:00Z"), 1, 4);
        r.mean_recovery_s = Some(12.5);
        r.missed_safeguards.insert("circuit breaker".into(), 1);
        l.scenarios.insert("L2_trigger_mesh_storm".into(), r);
        let path = l.save(&state).expect("saved");
        assert_eq!(path, state.join("learning.json"));
        assert_eq!(Learning::load(&state).expect("loads"), l);
        l.save(&state).expect("saved again");
        let files: Vec<_> = std::fs::read_dir(&state).expect("dir").flatten().collect();
        assert_eq!(files.len(), 1, "no temporary file left behind");
        std::fs::write(&path, "{not json").expect("write");
        assert!(
            Learning::load(&state).is_err(),
            "a broken record is an error, not a reset"
        );
    }

    #[test]
    fn a_skeleton_is_a_playbook_for_a_person_to_finish() {
        let m = Missing {
            safeguard: "circuit breaker".into(),
            subject: "mesh.breaker.opened".into(),
            detail: "never fired".into(),
            count: 0,
        };
        let text = playbook_skeleton("L2_trigger_mesh_storm", &m);
        assert!(text.contains("name: \"missing_circuit_breaker\""), "{text}");
        assert!(text.contains("NOT ENABLED"), "{text}");
        assert!(text.contains("fn playbook()"), "{text}");
        assert_eq!(
            slug("health monitor (worker declared dead)"),
            "health_monitor_worker_declared_dead"
        );
    }
}
