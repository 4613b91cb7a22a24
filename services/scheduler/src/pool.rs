//! The worker pool as the scheduler sees it: who is alive (heartbeats), how loaded each worker
//! is (the scheduler's own count of tasks it handed out), and how its recent tasks went; and
//! the choice of the least-loaded healthy worker, with the reasons in numbers.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bulwark_common::htm::Heartbeat;

/// Outcomes remembered per worker.
const RECENT: usize = 5;

/// One worker as known to the scheduler.
#[derive(Debug, Clone)]
pub struct WorkerState {
    /// Tasks the scheduler handed it that are not reported finished.
    pub assigned: u32,
    /// Tasks running by its last heartbeat (may include work from a previous scheduler).
    pub reported: u32,
    /// Tasks it runs at once, from its heartbeat.
    pub capacity: u32,
    /// CPU percent, from its heartbeat.
    pub cpu_percent: f64,
    /// Last heartbeat (or first sight).
    pub last_seen: Instant,
    /// Last outcomes, newest last: true = completed.
    pub recent: VecDeque<bool>,
    /// True until its first heartbeat (known only from a task it holds, after a restart).
    pub unconfirmed: bool,
    /// Its uptime by its last heartbeat, seconds (a lower one means it restarted).
    pub uptime_s: f64,
    /// The run id of its last heartbeat (another one means it restarted).
    pub run_id: Option<String>,
}

impl WorkerState {
    /// A worker known before its first heartbeat (from a task it holds, or from the registry):
    /// it takes no work until that heartbeat.
    fn unconfirmed(now: Instant, run_id: Option<String>) -> Self {
        WorkerState {
            assigned: 0,
            reported: 0,
            capacity: 1,
            cpu_percent: 0.0,
            last_seen: now,
            recent: VecDeque::new(),
            unconfirmed: true,
            uptime_s: 0.0,
            run_id,
        }
    }
}

/// The pool.
#[derive(Debug, Default)]
pub struct Pool {
    workers: BTreeMap<String, WorkerState>,
}

/// A worker choice and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The worker chosen.
    pub worker_id: String,
    /// Why: one line for the chosen worker, then the runners-up.
    pub reasons: Vec<String>,
}

impl Pool {
    /// Records a heartbeat.
    /// Returns the worker's uptime when this heartbeat shows it restarted (its uptime went
    /// down since the last one).
    pub fn heartbeat(&mut self, hb: &Heartbeat, now: Instant) -> Option<std::time::Duration> {
        let w = self
            .workers
            .entry(hb.worker_id.clone())
            .or_insert_with(|| WorkerState {
                assigned: 0,
                reported: hb.in_flight,
                capacity: hb.capacity,
                cpu_percent: hb.cpu_percent,
                last_seen: now,
                recent: VecDeque::new(),
                unconfirmed: false,
                uptime_s: hb.uptime_seconds,
                run_id: hb.run_id.clone(),
            });
        // A different run id means a new run (also for a worker known only from the registry);
        // without run ids, a lower uptime does, once a heartbeat confirmed the worker.
        let restarted = match (&w.run_id, &hb.run_id) {
            (Some(before), Some(now)) => before != now,
            _ => {
                !w.unconfirmed
                    && hb.uptime_seconds.is_finite()
                    && hb.uptime_seconds >= 0.0
                    && hb.uptime_seconds < w.uptime_s
            }
        };
        w.run_id = hb.run_id.clone();
        w.reported = hb.in_flight;
        w.capacity = hb.capacity;
        w.cpu_percent = hb.cpu_percent;
        w.last_seen = now;
        w.unconfirmed = false;
        w.uptime_s = hb.uptime_seconds;
        restarted.then(|| std::time::Duration::from_secs_f64(hb.uptime_seconds))
    }

    /// Notes a worker known only from a task it holds (after a scheduler restart, before its
    /// heartbeat arrives): it counts as alive until the heartbeat timeout says otherwise.
    pub fn adopt(&mut self, worker_id: &str, now: Instant) {
        let w = self
            .workers
            .entry(worker_id.to_owned())
            .or_insert_with(|| WorkerState::unconfirmed(now, None));
        w.assigned += 1;
    }

    /// Notes a worker known from the registry (a scheduler taking over): unconfirmed until its
    /// heartbeat, declared dead by [`remove_dead`](Self::remove_dead) if none comes within the
    /// timeout from `now`; a heartbeat under another run id shows it restarted.
    pub fn expect(&mut self, worker_id: &str, run_id: Option<String>, now: Instant) {
        self.workers
            .entry(worker_id.to_owned())
            .or_insert_with(|| WorkerState::unconfirmed(now, run_id));
    }

    /// Forgets the tasks counted as handed out (a scheduler tenure begins or ends); each
    /// worker's load is then what its heartbeat reports until tasks are handed out again.
    pub fn forget_assignments(&mut self) {
        for w in self.workers.values_mut() {
            w.assigned = 0;
        }
    }

    /// Takes no new work to `worker_id` until its next heartbeat (it did not accept a task).
    pub fn suspend(&mut self, worker_id: &str) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.unconfirmed = true;
        }
    }

    /// True when the worker is in the pool.
    pub fn contains(&self, worker_id: &str) -> bool {
        self.workers.contains_key(worker_id)
    }

    /// Workers whose last heartbeat is older than `timeout`; they are removed.
    pub fn remove_dead(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            self.workers.remove(id);
        }
        dead
    }

    /// Workers with a heartbeat that are not dead.
    pub fn healthy(&self) -> usize {
        self.workers.values().filter(|w| !w.unconfirmed).count()
    }

    /// Free slots over the healthy workers.
    pub fn free_slots(&self) -> u32 {
        self.workers
            .values()
            .filter(|w| !w.unconfirmed)
            .map(|w| w.capacity.saturating_sub(w.busy()))
            .sum()
    }

    /// Task slots over the healthy workers.
    pub fn capacity(&self) -> u32 {
        self.workers
            .values()
            .filter(|w| !w.unconfirmed)
            .map(|w| w.capacity)
            .sum()
    }

    /// Chooses the least-loaded healthy worker with a free slot, avoiding `avoid` when another
    /// can take the task, and reserves the slot. Score: share of slots in use, plus half the CPU
    /// share, plus 0.2 per failure among its last five tasks.
    pub fn choose(&mut self, avoid: Option<&str>) -> Option<Choice> {
        let mut ranked: Vec<(f64, &String, &WorkerState)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.unconfirmed && w.busy() < w.capacity)
            .map(|(id, w)| (score(w), id, w))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        if ranked.len() > 1
            && let Some(avoid) = avoid
        {
            ranked.retain(|(_, id, _)| id.as_str() != avoid);
        }
        let reasons: Vec<String> = ranked
            .iter()
            .take(3)
            .enumerate()
            .map(|(i, (_, id, w))| {
                let line = describe(id, w);
                if i == 0 {
                    format!("chose {line}")
                } else {
                    format!("over {line}")
                }
            })
            .collect();
        let worker_id = ranked.first().map(|(_, id, _)| (*id).clone())?;
        if let Some(w) = self.workers.get_mut(&worker_id) {
            w.assigned += 1;
        }
        Some(Choice { worker_id, reasons })
    }

    /// Frees a slot of `worker_id` and remembers the outcome (`None`: no outcome, e.g. the
    /// worker did not accept).
    pub fn release(&mut self, worker_id: &str, outcome: Option<bool>) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.assigned = w.assigned.saturating_sub(1);
            if let Some(ok) = outcome {
                w.recent.push_back(ok);
                while w.recent.len() > RECENT {
                    w.recent.pop_front();
                }
            }
        }
    }

    /// Summary per worker, for readiness and telemetry.
    pub fn describe_all(&self) -> Vec<String> {
        self.workers.iter().map(|(id, w)| describe(id, w)).collect()
    }
}

impl WorkerState {
    /// Slots in use: what the scheduler handed out, or what the worker reports running if that
    /// is more (tasks of a previous scheduler, or of another replica).
    pub fn busy(&self) -> u32 {
        self.assigned.max(self.reported)
    }
}

fn score(w: &WorkerState) -> f64 {
    let load = f64::from(w.busy()) / f64::from(w.capacity.max(1));
    let failures = w.recent.iter().filter(|ok| !**ok).count() as f64;
    load + (w.cpu_percent / 100.0).clamp(0.0, 1.0) * 0.5 + failures * 0.2
}

fn describe(id: &str, w: &WorkerState) -> String {
    let failures = w.recent.iter().filter(|ok| !**ok).count();
    let history = if w.recent.is_empty() {
        "no tasks yet".to_owned()
    } else if failures == 0 {
        format!("last {} tasks ok", w.recent.len())
    } else {
        format!("{failures} of last {} tasks failed", w.recent.len())
    };
    format!(
        "{id}: {}/{} in flight, CPU {:.0}%, {history}",
        w.busy(),
        w.capacity,
        w.cpu_percent
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hb(id: &str, capacity: u32, cpu: f64) -> Heartbeat {
        Heartbeat {
            worker_id: id.into(),
            cpu_percent: cpu,
            memory_mb: 10.0,
            in_flight: 0,
            capacity,
            tasks_completed: 0,
            tasks_failed: 0,
            uptime_seconds: 1.0,
            run_id: None,
            timestamp: String::new(),
        }
    }

    #[test]
    fn a_worker_known_only_from_the_registry_is_declared_dead_without_a_heartbeat() {
        let mut pool = Pool::default();
        let start = Instant::now();
        pool.expect("gone", Some("run-1".into()), start);
        pool.expect("back", Some("run-1".into()), start);
        pool.expect("same", Some("run-1".into()), start);
        assert_eq!(pool.free_slots(), 0, "unconfirmed workers take no work");
        let mut back = hb("back", 4, 0.0);
        back.run_id = Some("run-2".into());
        assert!(
            pool.heartbeat(&back, start).is_some(),
            "a new run of a registered worker is a restart"
        );
        let mut same = hb("same", 4, 0.0);
        same.run_id = Some("run-1".into());
        assert_eq!(pool.heartbeat(&same, start), None, "the same run goes on");
        assert_eq!(pool.free_slots(), 8);
        let later = start + Duration::from_secs(11);
        pool.heartbeat(&back, later);
        pool.heartbeat(&same, later);
        assert_eq!(
            pool.remove_dead(later, Duration::from_secs(10)),
            vec!["gone".to_owned()]
        );
    }

    #[test]
    fn forgetting_assignments_leaves_the_heartbeat_load() {
        let mut pool = Pool::default();
        let now = Instant::now();
        let mut w = hb("w", 2, 0.0);
        pool.heartbeat(&w, now);
        assert!(pool.choose(None).is_some());
        assert!(pool.choose(None).is_some());
        assert_eq!(pool.free_slots(), 0);
        pool.forget_assignments();
        assert_eq!(pool.free_slots(), 2);
        w.in_flight = 1;
        pool.heartbeat(&w, now);
        assert_eq!(
            pool.free_slots(),
            1,
            "what the worker reports running still counts"
        );
    }

    #[test]
    fn a_new_run_id_or_a_lower_uptime_is_a_restart() {
        let mut pool = Pool::default();
        let now = Instant::now();
        let mut b = hb("w", 4, 0.0);
        b.run_id = Some("run-1".into());
        assert_eq!(pool.heartbeat(&b, now), None, "first sight");
        b.uptime_seconds = 5.0;
        assert_eq!(pool.heartbeat(&b, now), None, "same run");
        b.run_id = Some("run-2".into());
        b.uptime_seconds = 9.0;
        assert!(
            pool.heartbeat(&b, now).is_some(),
            "another run id, whatever the uptime"
        );
        // Without run ids (a foreign worker), the uptime going down tells.
        let mut c = hb("x", 4, 0.0);
        c.uptime_seconds = 30.0;
        assert_eq!(pool.heartbeat(&c, now), None);
        c.uptime_seconds = 0.5;
        assert_eq!(
            pool.heartbeat(&c, now),
            Some(std::time::Duration::from_secs_f64(0.5))
        );
    }

    #[test]
    fn least_loaded_wins_and_reasons_have_numbers() {
        let now = Instant::now();
        let mut pool = Pool::default();
        pool.heartbeat(&hb("w1", 8, 10.0), now);
        pool.heartbeat(&hb("w2", 8, 10.0), now);
        let first = pool.choose(None).expect("a worker");
        assert_eq!(first.worker_id, "w1", "ties break by id");
        let second = pool.choose(None).expect("a worker");
        assert_eq!(second.worker_id, "w2", "w1 now has 1/8 in flight");
        assert_eq!(
            second.reasons[0],
            "chose w2: 0/8 in flight, CPU 10%, no tasks yet"
        );
        assert_eq!(
            second.reasons[1],
            "over w1: 1/8 in flight, CPU 10%, no tasks yet"
        );
    }

    #[test]
    fn cpu_and_failures_count_against_a_worker() {
        let now = Instant::now();
        let mut pool = Pool::default();
        pool.heartbeat(&hb("busy", 8, 95.0), now);
        pool.heartbeat(&hb("calm", 8, 5.0), now);
        assert_eq!(pool.choose(None).expect("w").worker_id, "calm");
        pool.release("calm", Some(false));
        pool.release("calm", Some(false));
        pool.release("calm", Some(false));
        let c = pool.choose(None).expect("w");
        assert_eq!(c.worker_id, "busy", "three recent failures outweigh CPU");
        assert!(
            c.reasons[1].contains("3 of last 3 tasks failed"),
            "{:?}",
            c.reasons
        );
    }

    #[test]
    fn full_dead_and_unconfirmed_workers_are_not_chosen() {
        let now = Instant::now();
        let mut pool = Pool::default();
        pool.heartbeat(&hb("w1", 1, 0.0), now);
        assert!(pool.choose(None).is_some());
        assert!(pool.choose(None).is_none(), "w1 is full");
        pool.heartbeat(&hb("w2", 4, 0.0), now);
        pool.suspend("w2");
        assert!(
            pool.choose(None).is_none(),
            "a suspended worker takes no new work"
        );
        pool.heartbeat(&hb("w2", 4, 0.0), now);
        assert_eq!(
            pool.choose(None).expect("w").worker_id,
            "w2",
            "its heartbeat restores it"
        );
        pool.adopt("ghost", now);
        assert_eq!(
            pool.choose(None).map(|c| c.worker_id),
            Some("w2".to_owned()),
            "an adopted worker takes no new work before its heartbeat"
        );
        let later = now + Duration::from_secs(31);
        let dead = pool.remove_dead(later, Duration::from_secs(30));
        assert_eq!(
            dead,
            vec!["ghost".to_owned(), "w1".to_owned(), "w2".to_owned()]
        );
        assert_eq!(pool.healthy(), 0);
    }

    #[test]
    fn avoid_moves_a_reassigned_task_elsewhere() {
        let now = Instant::now();
        let mut pool = Pool::default();
        pool.heartbeat(&hb("w1", 8, 0.0), now);
        pool.heartbeat(&hb("w2", 8, 50.0), now);
        assert_eq!(pool.choose(Some("w1")).expect("w").worker_id, "w2");
        let mut alone = Pool::default();
        alone.heartbeat(&hb("w1", 8, 0.0), now);
        assert_eq!(
            alone.choose(Some("w1")).expect("w").worker_id,
            "w1",
            "the only worker is used anyway"
        );
    }

    proptest! {
        #[test]
        fn never_over_capacity(caps in proptest::collection::vec(1u32..5, 1..6), picks in 0usize..40) {
            let now = Instant::now();
            let mut pool = Pool::default();
            for (i, c) in caps.iter().enumerate() {
                pool.heartbeat(&hb(&format!("w{i}"), *c, 0.0), now);
            }
            let total: u32 = caps.iter().sum();
            let mut chosen = 0;
            for _ in 0..picks {
                if pool.choose(None).is_some() { chosen += 1; }
            }
            prop_assert_eq!(chosen, picks.min(total as usize));
            prop_assert_eq!(pool.free_slots(), total - chosen as u32);
        }
    }
}
