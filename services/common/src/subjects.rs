//! Every NATS subject bulwark uses, in one place.
//!
//! The external ones are fixed by CONTRACT.md; internal ones (the task queue) are ours to design.
//! Services refer to these constants and builders, never to string literals.

/// Intake of intents: request/reply, NATS micro endpoint of service `governance`.
pub const INTENT_SUBMIT: &str = "htm.intent.submit";
/// Intake of intents from a named agent, `htm.intent.submit.<name>`: the `actor` is bound to the
/// sender (only NATS user `<name>` may publish there; docs/security.md).
pub const INTENT_SUBMIT_AS: &str = "htm.intent.submit.*";
/// Status of an intent: request `{"intent_id"}`, reply the status with history.
pub const INTENT_STATUS: &str = "htm.intent.status";
/// Cancellation of an intent: request `{"intent_id", "reason"?}` (governance; docs/actions.md).
pub const INTENT_CANCEL: &str = "htm.intent.cancel";

/// Prefix of the durable task queue; one subject per priority, `htm.task.queue.<0-9>`.
pub const TASK_QUEUE_PREFIX: &str = "htm.task.queue";
/// Wildcard covering the whole task queue.
pub const TASK_QUEUE_ALL: &str = "htm.task.queue.*";

/// Subject of the task queue for one priority (0-9, 9 most urgent).
pub fn task_queue(priority: u8) -> String {
    format!("{TASK_QUEUE_PREFIX}.{priority}")
}

/// Human review queue: request `{}`, reply `{"items": [...]}`.
pub const REVIEW_PENDING: &str = "governance.review.pending";
/// Human review decision: request `{"intent_id","decision","reviewer","reason"}`.
pub const REVIEW_DECIDE: &str = "governance.review.decide";

/// Review decisions of a named reviewer, `governance.review.decide.<name>`: the `reviewer` is
/// bound to the sender (only NATS user `<name>` may publish there; docs/security.md).
pub const REVIEW_DECIDE_AS: &str = "governance.review.decide.*";

/// Per-identity subject of `plain` for `name` (`governance.review.decide` + `alice` ->
/// `governance.review.decide.alice`).
pub fn as_identity(plain: &str, name: &str) -> String {
    format!("{plain}.{}", subject_token(name))
}

/// Prefix of proposal announcements, `unified_logic.proposal.<intent_id>`.
pub const PROPOSAL_PREFIX: &str = "unified_logic.proposal";
/// Unified logic vote: request `{"proposal_id","voter","vote","reason"}`, reply the tally.
pub const VOTE: &str = "unified_logic.vote";
/// Votes of a named voter, `unified_logic.vote.<name>`: the `voter` is bound to the sender (only
/// NATS user `<name>` may publish there; docs/security.md).
pub const VOTE_AS: &str = "unified_logic.vote.*";
/// Open proposals: request `{}`, reply `{"items": [...]}` (bulwark's addition to the contract).
pub const PROPOSALS_OPEN: &str = "unified_logic.proposals";

/// Subject on which the proposal for `intent_id` is announced.
pub fn proposal(intent_id: &str) -> String {
    format!("{PROPOSAL_PREFIX}.{intent_id}")
}

/// Prefix of 5W1H narratives, `clarity.narrative.<who>`.
pub const NARRATIVE_PREFIX: &str = "clarity.narrative";
/// Wildcard covering every narrative.
pub const NARRATIVE_ALL: &str = "clarity.narrative.>";

/// Subject a narrative from `who` is published on.
pub fn narrative(who: &str) -> String {
    format!("{NARRATIVE_PREFIX}.{}", subject_token(who))
}

/// Prefix of the trigger mesh, `mesh.<event_type>`.
pub const MESH_PREFIX: &str = "mesh";
/// Wildcard covering every mesh event.
pub const MESH_ALL: &str = "mesh.>";
/// Where a mesh event published by a client of another account arrives in bulwark's account:
/// `ingress.mesh.<identity>.<event_type>`, as `nats.conf`'s imports map that account's `mesh.>`
/// (the identity is chosen by the server's configuration, never by the publisher).
pub const MESH_INGRESS_PREFIX: &str = "ingress.mesh";
/// Every ingress mesh event.
pub const MESH_INGRESS_ALL: &str = "ingress.mesh.>";
/// Event types only bulwark's services may produce (the safeguards' own); an ingress event of one
/// of these types is dead-lettered.
pub const MESH_RESERVED: [&str; 8] = [
    "task.>",
    "breaker.>",
    "layer2.>",
    "playbook.>",
    "deadletter",
    "event.emergency",
    "event.incident",
    "advisory.>",
];

/// Where a mesh subject came from and what its event type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshSubject<'a> {
    /// The event type: the subject after `mesh.` or after `ingress.mesh.<identity>.`.
    pub event_type: &'a str,
    /// The publishing identity of an ingress event; `None` for the services' own `mesh.>`.
    pub identity: Option<&'a str>,
}

/// Parses a mesh subject: `mesh.a.b` -> type `a.b` from a service; `ingress.mesh.agent.a.b` ->
/// type `a.b` from identity `agent`. `None` for other subjects (and an ingress subject without a
/// type).
pub fn mesh_subject(subject: &str) -> Option<MeshSubject<'_>> {
    if let Some(rest) = subject.strip_prefix("ingress.mesh.") {
        let (identity, event_type) = rest.split_once('.')?;
        Some(MeshSubject {
            event_type,
            identity: Some(identity),
        })
    } else {
        subject.strip_prefix("mesh.").map(|event_type| MeshSubject {
            event_type,
            identity: None,
        })
    }
}

/// Dead letters of the mesh: malformed events with the reason.
pub const MESH_DEADLETTER: &str = "mesh.deadletter";
/// Incidents raised by the safeguards (they name the playbook to run).
pub const MESH_INCIDENT: &str = "mesh.event.incident";
/// Emergencies raised by the safeguards.
pub const MESH_EMERGENCY: &str = "mesh.event.emergency";

/// Subject of the mesh event with this `event_type` (`task.completed` -> `mesh.task.completed`).
pub fn mesh(event_type: &str) -> String {
    format!("{MESH_PREFIX}.{event_type}")
}

/// Prefix of periodic telemetry, `telemetry.<component>`.
pub const TELEMETRY_PREFIX: &str = "telemetry";

/// Subject of the telemetry of `component`.
pub fn telemetry(component: &str) -> String {
    format!("{TELEMETRY_PREFIX}.{}", subject_token(component))
}

/// Makes `raw` safe as one subject token: dots, spaces and wildcards become `_`.
pub fn subject_token(raw: &str) -> String {
    let token: String = raw
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' | ' ' | '\t' | '\r' | '\n' => '_',
            c => c,
        })
        .collect();
    if token.is_empty() {
        "_".to_owned()
    } else {
        token
    }
}

/// True when `event_type` is one or more dot-separated tokens of `[a-z0-9_-]` (CONTRACT section 1).
pub fn is_valid_event_type(event_type: &str) -> bool {
    !event_type.is_empty()
        && event_type.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        })
}

/// Clarity query: request `{who?, what?, intent_id?, correlation_id?, since?, limit?}`, reply
/// `{"items": [...]}` (NATS micro endpoint of service `clarity`).
pub const CLARITY_QUERY: &str = "clarity.query";
/// Clarity chain verification: request `{}`, reply `{"ok", "records", "first_bad_seq"}`.
pub const CLARITY_VERIFY: &str = "clarity.verify";
/// The hash-chained audit records clarity appends to the `BULWARK_AUDIT` stream (internal).
pub const CLARITY_AUDIT: &str = "clarity.audit";

/// The breaker opened: `{scope, event_count, threshold, window_s, cooldown_s}` (CONTRACT section 1).
pub const MESH_BREAKER_OPENED: &str = "mesh.breaker.opened";
/// The breaker went half-open (same fields as [`MESH_BREAKER_OPENED`]).
pub const MESH_BREAKER_HALF_OPEN: &str = "mesh.breaker.half_open";
/// The breaker closed (same fields as [`MESH_BREAKER_OPENED`]).
pub const MESH_BREAKER_CLOSED: &str = "mesh.breaker.closed";
/// Throttle advisories of the storm guard, naming the flooding `source` and the rate it may use
/// (bulwark's addition to the contract).
pub const MESH_THROTTLE: &str = "mesh.advisory.throttle";
/// Mesh events that pass an open breaker: emergencies, breaker transitions, critical alerts.
pub const MESH_CRITICAL: [&str; 3] = [
    "mesh.event.emergency",
    "mesh.breaker.>",
    "mesh.layer2.critical_alert",
];
/// Storm guard status: request `{}`, reply the breaker and the current storms (micro service
/// `storm_guard`).
pub const STORM_GUARD_STATUS: &str = "storm_guard.status";
/// Event policy engine rules: request `{}`, reply the loaded rules (micro service
/// `event_policy_engine`).
pub const EVENT_POLICY_RULES: &str = "event_policy.rules";

/// Prefix of worker heartbeats, `htm.heartbeat.<worker_id>` (CONTRACT section 3 named
/// `htm.worker.heartbeat.<worker_id>`; moved out of `htm.worker.` because workers live in an
/// account of their own in `nats.conf`, and an import of heartbeats overlapping the export of
/// assignments, `htm.worker.*.task`, is a cycle the server refuses).
pub const WORKER_HEARTBEAT_PREFIX: &str = "htm.heartbeat";
/// Wildcard covering every worker heartbeat.
pub const WORKER_HEARTBEAT_ALL: &str = "htm.heartbeat.*";

/// Subject of the heartbeat of `worker_id`.
pub fn worker_heartbeat(worker_id: &str) -> String {
    format!("{WORKER_HEARTBEAT_PREFIX}.{}", subject_token(worker_id))
}

/// Subject on which `worker_id` takes assignments (request/reply).
pub fn worker_task(worker_id: &str) -> String {
    format!("htm.worker.{}.task", subject_token(worker_id))
}

/// Subject on which `worker_id` takes cancellations of the tasks it runs (request/reply,
/// `{"task_id", "fence"}`; sent by governance when an intent is cancelled).
pub fn worker_cancel(worker_id: &str) -> String {
    format!("htm.worker.{}.cancel", subject_token(worker_id))
}

/// Workers report task outcomes here (request/reply, served by the scheduler).
pub const TASK_RESULT: &str = "htm.task.result";
/// Prefix of the parked (shed) tasks, `htm.task.parked.<priority>`.
pub const TASK_PARKED_PREFIX: &str = "htm.task.parked";
/// Wildcard covering the parked tasks.
pub const TASK_PARKED_ALL: &str = "htm.task.parked.*";

/// Subject of a parked task of `priority`.
pub fn task_parked(priority: u8) -> String {
    format!("{TASK_PARKED_PREFIX}.{priority}")
}

/// Tasks that failed after their last attempt, with their history.
pub const TASK_DEAD: &str = "htm.task.dead";
/// Scheduler: stop dispatching (request `{}`).
pub const SCHEDULER_PAUSE: &str = "scheduler.pause";
/// Scheduler: dispatch again (request `{}`).
pub const SCHEDULER_RESUME: &str = "scheduler.resume";
/// Scheduler: park low-priority old tasks, `{"max"?, "below_priority"?, "older_than_s"?}`.
pub const SCHEDULER_SHED: &str = "scheduler.shed";
/// Scheduler: bring parked tasks back into the queue, `{"max"?}`.
pub const SCHEDULER_REPLAY: &str = "scheduler.replay";
/// HTM and scheduler readiness (request `{}`).
pub const HTM_READINESS: &str = "htm.readiness";
/// Prefix of replica heartbeats, `replica.heartbeat.<service>.<replica_id>`.
pub const REPLICA_HEARTBEAT_PREFIX: &str = "replica.heartbeat";
/// Wildcard covering every replica heartbeat.
pub const REPLICA_HEARTBEAT_ALL: &str = "replica.heartbeat.>";

/// Subject of the heartbeat of replica `replica_id` of `service`.
pub fn replica_heartbeat(service: &str, replica_id: &str) -> String {
    format!(
        "{REPLICA_HEARTBEAT_PREFIX}.{}.{}",
        subject_token(service),
        subject_token(replica_id)
    )
}

/// Fault injection into one replica (chaos, tests): `{"errors": n, "reason"}`; the reply is
/// the replica's heartbeat.
pub fn replica_fault(replica_id: &str) -> String {
    format!("replica.fault.{}", subject_token(replica_id))
}

/// Requests a standby scheduler forwards to the leader, `scheduler.leader.<op>` (internal;
/// served only by the replica holding the `scheduler` lease).
pub const SCHEDULER_LEADER_ALL: &str = "scheduler.leader.*";

/// Subject on which the scheduler leader serves forwarded requests of `op`
/// (`result`, `pause`, `resume`, `shed`, `replay`, `readiness`).
pub fn scheduler_leader(op: &str) -> String {
    format!("scheduler.leader.{}", subject_token(op))
}

/// The watchdog's Layer 2 report: request `{}`, reply `{overall_health, all_ready, components}`
/// (CONTRACT section 5; NATS micro service `watchdog`).
pub const WATCHDOG_REPORT: &str = "watchdog.report";
/// The watchdog's own telemetry (overall health, active conditions, alerts sent).
pub const TELEMETRY_LAYER2: &str = "telemetry.layer2";
/// Wildcard covering every component's telemetry.
pub const TELEMETRY_ALL: &str = "telemetry.>";
/// Prefix of Layer 2 alerts, `mesh.layer2.<severity>_alert` (CONTRACT section 1).
pub const LAYER2_ALERT_PREFIX: &str = "mesh.layer2";

/// Event type of a Layer 2 alert of `severity` (`warning`, `high`, `critical`):
/// `layer2.<severity>_alert`, published on `mesh.layer2.<severity>_alert`.
pub fn layer2_alert_type(severity: &str) -> String {
    format!("layer2.{}_alert", subject_token(severity))
}

/// Worker pool: the workers and their states (request `{}`; NATS micro service `htm_pool`).
pub const POOL_STATUS: &str = "htm.pool.status";
/// Worker pool: kill a worker, `{"worker_id", "mode": "crash"|"hang"}` (fault injection).
pub const POOL_KILL: &str = "htm.pool.kill";
/// Worker pool: respawn a worker, `{"worker_id"?}` (every dead one when absent).
pub const POOL_RESPAWN: &str = "htm.pool.respawn";

/// Storm guard: open the breaker by hand, `{"reason", "by"?}`.
pub const STORM_GUARD_BREAKER_OPEN: &str = "storm_guard.breaker.open";
/// Storm guard: close the breaker by hand, `{"reason", "by"?}`.
pub const STORM_GUARD_BREAKER_CLOSE: &str = "storm_guard.breaker.close";
/// Storm guard: limit one event type's delivery rate, `{"event_type", "limit_per_second", "for_s",
/// "reason", "by"?}`.
pub const STORM_GUARD_LIMIT: &str = "storm_guard.limit";
/// Storm guard: throttle one publisher, `{"source", "event_type", "limit_per_second", "for_s"?,
/// "reason", "by"?}`.
pub const STORM_GUARD_THROTTLE: &str = "storm_guard.throttle";
/// Storm guard: event rates by type and by source over the storm window (request `{}`).
pub const STORM_GUARD_RATES: &str = "storm_guard.rates";

/// Playbooks: start a run by hand, `{"playbook", "params"?, "dry_run"?, "wait"?}` (NATS micro
/// service `playbooks`).
pub const PLAYBOOK_RUN: &str = "playbook.run";
/// Playbooks: every loaded playbook with its metadata and last run (request `{}`).
pub const PLAYBOOK_LIST: &str = "playbook.list";
/// Playbooks: compile every file again and report the errors (request `{}`).
pub const PLAYBOOK_CHECK: &str = "playbook.check";
/// Playbooks: compile every file again and use them when all compile (request `{}`).
pub const PLAYBOOK_RELOAD: &str = "playbook.reload";
/// Prefix of playbook run events, `mesh.playbook.started|step|completed|failed` (CONTRACT
/// section 1).
pub const PLAYBOOK_EVENT_PREFIX: &str = "playbook";

/// The notify service's delivery log: request `{limit?, kind?, outcome?}`, reply
/// `{"deliveries": [...], "pending", "counters"}` (docs/console.md).
pub const NOTIFY_LOG: &str = "notify.log";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_follow_the_contract() {
        assert_eq!(task_queue(9), "htm.task.queue.9");
        assert_eq!(proposal("abc"), "unified_logic.proposal.abc");
        assert_eq!(narrative("governance"), "clarity.narrative.governance");
        assert_eq!(narrative("a.b c"), "clarity.narrative.a_b_c");
        assert_eq!(mesh("task.completed"), "mesh.task.completed");
        assert_eq!(telemetry("scheduler"), "telemetry.scheduler");
        assert_eq!(worker_heartbeat("w1"), "htm.heartbeat.w1");
        assert_eq!(worker_task("w1"), "htm.worker.w1.task");
        assert_eq!(as_identity(VOTE, "guardian"), "unified_logic.vote.guardian");
        assert_eq!(
            as_identity(REVIEW_DECIDE, "a.b"),
            "governance.review.decide.a_b"
        );
    }

    #[test]
    fn event_types() {
        assert!(is_valid_event_type("task.completed"));
        assert!(is_valid_event_type("layer2.high_alert"));
        assert!(is_valid_event_type("a-b.c_d.9"));
        assert!(!is_valid_event_type(""));
        assert!(!is_valid_event_type("a..b"));
        assert!(!is_valid_event_type("Task.done"));
        assert!(!is_valid_event_type("a.*"));
        assert!(!is_valid_event_type("a b"));
    }
}
