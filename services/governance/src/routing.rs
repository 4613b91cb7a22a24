//! Tier routing and mission alignment: the pure decision of what happens to an intent.
//!
//! # Mission alignment
//! `alignment = round2(base × pillar)`, where `base` is the intent type's base alignment and
//! `pillar` is the highest charter weight among the pillars flagged in `mission_context`
//! (resilience 1.0, revenue 0.8, autonomy 0.7, learning 0.6), or `unstated_pillar_weight` (0.5)
//! when none is flagged. `mission_context.emergency` makes it 1.0. A tier 1 or 2 intent whose
//! alignment is below `min_alignment` (0.25) is escalated to human review.
//!
//! # Tiers
//! | tier | status | approved | what follows |
//! |---|---|---|---|
//! | 0 | pending_review | false | a review item that must be decided |
//! | 1 | queued | true | the task, and a post-execution review record |
//! | 2 | queued | true | the task |
//! | 3 | pending_vote | false | a unified logic proposal |
//! | 4 | queued at priority 9 | true | the task, and a post-hoc review record |

use bulwark_common::config::GovernanceConfig;
use bulwark_common::intent::{Intent, IntentStatus, Tier};

use crate::review::ReviewKind;

/// Priority of emergencies: the top of the queue.
pub const EMERGENCY_PRIORITY: u8 = 9;

/// The decision for one intent, before any side effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The autonomy tier.
    pub tier: Tier,
    /// Mission alignment, 0-1, two decimals.
    pub alignment: f64,
    /// Status right after acceptance.
    pub status: IntentStatus,
    /// Cleared to execute now.
    pub approved: bool,
    /// Waits for the vote.
    pub requires_vote: bool,
    /// Goes through a human (before or after execution).
    pub requires_human: bool,
    /// Where it went.
    pub routed_to: &'static str,
    /// Priority it is queued with.
    pub priority: u8,
    /// The review item to create, if any.
    pub review: Option<ReviewKind>,
    /// Why, with the numbers.
    pub reasoning: Vec<String>,
}

impl Route {
    /// True when the task goes into the queue at once.
    pub fn enqueues(&self) -> bool {
        self.status == IntentStatus::Queued
    }
}

/// The mission alignment of `intent` with the reason line explaining it.
pub fn alignment(intent: &Intent, base: f64, cfg: &GovernanceConfig) -> (f64, String) {
    let ctx = &intent.mission_context;
    if ctx.emergency {
        return (
            1.0,
            "Mission alignment 1.00 (emergency declared)".to_owned(),
        );
    }
    let c = &cfg.charter;
    let flagged: Vec<(&str, f64)> = [
        ("resilience", ctx.resilience_impact, c.resilience),
        ("revenue", ctx.revenue_impact, c.revenue),
        ("autonomy", ctx.autonomy_impact, c.autonomy),
        ("learning", ctx.learning_impact, c.learning),
    ]
    .into_iter()
    .filter(|(_, on, _)| *on)
    .map(|(name, _, weight)| (name, weight))
    .collect();
    let (pillar_name, weight) = flagged
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("no pillar stated", cfg.unstated_pillar_weight));
    let score = round2((base * weight).clamp(0.0, 1.0));
    let line = format!(
        "Mission alignment {score:.2} ({pillar_name}): base {base:.2} × charter weight {weight:.2}"
    );
    (score, line)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Routes `intent` according to the tier table and charter of `cfg`.
pub fn route(intent: &Intent, cfg: &GovernanceConfig) -> Route {
    let mut reasoning = Vec::new();
    let (tier_number, base) = match cfg.intent_types.get(&intent.intent_type) {
        Some(t) => (t.tier, t.base_alignment),
        None => {
            reasoning.push(format!(
                "Unknown intent type {:?}: default tier {}",
                intent.intent_type, cfg.default_tier
            ));
            (cfg.default_tier, cfg.default_base_alignment)
        }
    };
    // Config validation keeps tiers in 0-4; an impossible value is treated as the strictest tier.
    let tier = Tier::from_number(tier_number).unwrap_or(Tier::HumanRequired);
    let (alignment, alignment_line) = alignment(intent, base, cfg);
    let voters = &cfg.voters;
    let mut route = match tier {
        Tier::HumanRequired => Route {
            tier,
            alignment,
            status: IntentStatus::PendingReview,
            approved: false,
            requires_vote: false,
            requires_human: true,
            routed_to: tier.routed_to(),
            priority: intent.priority,
            review: Some(ReviewKind::Approval),
            reasoning: vec!["Tier 0: human approval required before execution".to_owned()],
        },
        Tier::ReviewRequired => Route {
            tier,
            alignment,
            status: IntentStatus::Queued,
            approved: true,
            requires_vote: false,
            requires_human: true,
            routed_to: tier.routed_to(),
            priority: intent.priority,
            review: Some(ReviewKind::PostExecution),
            reasoning: vec!["Tier 1: executes now, post-execution review recorded".to_owned()],
        },
        Tier::AutonomousLowRisk => Route {
            tier,
            alignment,
            status: IntentStatus::Queued,
            approved: true,
            requires_vote: false,
            requires_human: false,
            routed_to: tier.routed_to(),
            priority: intent.priority,
            review: None,
            reasoning: vec!["Tier 2: low risk, direct execution".to_owned()],
        },
        Tier::AutonomousHighImpact => Route {
            tier,
            alignment,
            status: IntentStatus::PendingVote,
            approved: false,
            requires_vote: true,
            requires_human: false,
            routed_to: tier.routed_to(),
            priority: intent.priority,
            review: None,
            reasoning: vec![format!(
                "Tier 3: high impact, unified logic vote required (quorum {} of {})",
                voters.quorum,
                voters.names.len()
            )],
        },
        Tier::Emergency => Route {
            tier,
            alignment,
            status: IntentStatus::Queued,
            approved: true,
            requires_vote: false,
            requires_human: true,
            routed_to: tier.routed_to(),
            priority: EMERGENCY_PRIORITY,
            review: Some(ReviewKind::PostHoc),
            reasoning: vec![format!(
                "Tier 4: emergency, queued at once at priority {EMERGENCY_PRIORITY}, post-hoc review recorded"
            )],
        },
    };
    // The unknown-type line (if any) comes first, then the tier, then alignment.
    reasoning.append(&mut route.reasoning);
    reasoning.push(alignment_line);
    if matches!(tier, Tier::ReviewRequired | Tier::AutonomousLowRisk)
        && alignment < cfg.min_alignment
    {
        reasoning.push(format!(
            "Mission alignment {alignment:.2} is below min_alignment {:.2}: escalated to human review",
            cfg.min_alignment
        ));
        route.status = IntentStatus::PendingReview;
        route.approved = false;
        route.requires_human = true;
        route.routed_to = Tier::HumanRequired.routed_to();
        route.review = Some(ReviewKind::LowAlignment);
    }
    if !intent.ignored_fields.is_empty() {
        reasoning.push(format!(
            "Ignored unknown field(s): {}",
            intent.ignored_fields.join(", ")
        ));
    }
    route.reasoning = reasoning;
    route
}

/// Whether the sender of an intent may claim what only privileged identities may
/// (`governance.privileged_identities`; bulwark's own services always may).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// A service, or a listed identity.
    Privileged,
    /// Any other identity.
    Unprivileged,
}

/// What an unprivileged sender asked for beyond its rights: `Err` with the reason to refuse
/// (priority above the cap), or `Ok` after taking back an emergency it declared: the intent goes
/// to human review instead of running at once at the emergency priority (a person decides
/// whether it really is one). `sender` names the identity in the reasons.
pub fn earn(
    route: &mut Route,
    intent: &Intent,
    privilege: Privilege,
    sender: &str,
    cfg: &GovernanceConfig,
) -> Result<(), String> {
    if privilege == Privilege::Privileged {
        return Ok(());
    }
    if intent.priority > cfg.max_unprivileged_priority {
        return Err(format!(
            "priority {} is above governance.max_unprivileged_priority = {} for {sender}, which is not in governance.privileged_identities",
            intent.priority, cfg.max_unprivileged_priority
        ));
    }
    let claimed = route.tier == Tier::Emergency || intent.mission_context.emergency;
    if claimed && route.status != IntentStatus::PendingReview {
        route.reasoning.push(format!(
            "An emergency declared by {sender}, which is not in governance.privileged_identities: a human decides (no emergency priority, no alignment bonus until approved)"
        ));
        route.status = IntentStatus::PendingReview;
        route.approved = false;
        route.requires_human = true;
        route.requires_vote = false;
        route.routed_to = Tier::HumanRequired.routed_to();
        route.review = Some(ReviewKind::Approval);
        route.priority = intent.priority;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_common::intent::MissionContext;
    use proptest::prelude::*;

    fn intent(kind: &str, ctx: MissionContext) -> Intent {
        Intent {
            intent_id: "i".into(),
            intent_type: kind.into(),
            actor: "a".into(),
            payload: serde_json::json!({}),
            priority: 5,
            mission_context: ctx,
            correlation_id: "i".into(),
            ignored_fields: vec![],
            not_before: None,
        }
    }

    fn resilient() -> MissionContext {
        MissionContext {
            resilience_impact: true,
            ..Default::default()
        }
    }

    #[test]
    fn seed_types_route_to_their_tiers() {
        let cfg = GovernanceConfig::default();
        let expect = [
            (
                "query_knowledge",
                2,
                IntentStatus::Queued,
                true,
                "direct_execution",
            ),
            (
                "generate_summary",
                2,
                IntentStatus::Queued,
                true,
                "direct_execution",
            ),
            (
                "schedule_task",
                2,
                IntentStatus::Queued,
                true,
                "direct_execution",
            ),
            (
                "execute_sandbox",
                1,
                IntentStatus::Queued,
                true,
                "execute_with_review",
            ),
            (
                "deploy_model",
                1,
                IntentStatus::Queued,
                true,
                "execute_with_review",
            ),
            (
                "modify_config",
                1,
                IntentStatus::Queued,
                true,
                "execute_with_review",
            ),
            (
                "self_improve",
                3,
                IntentStatus::PendingVote,
                false,
                "unified_logic_hub",
            ),
            (
                "extend_grace",
                3,
                IntentStatus::PendingVote,
                false,
                "unified_logic_hub",
            ),
            (
                "optimize_system",
                3,
                IntentStatus::PendingVote,
                false,
                "unified_logic_hub",
            ),
            (
                "modify_governance",
                0,
                IntentStatus::PendingReview,
                false,
                "human_review_queue",
            ),
            (
                "change_charter",
                0,
                IntentStatus::PendingReview,
                false,
                "human_review_queue",
            ),
            (
                "grant_permissions",
                0,
                IntentStatus::PendingReview,
                false,
                "human_review_queue",
            ),
            (
                "emergency_recovery",
                4,
                IntentStatus::Queued,
                true,
                "emergency_handler",
            ),
            (
                "critical_incident",
                4,
                IntentStatus::Queued,
                true,
                "emergency_handler",
            ),
        ];
        for (kind, tier, status, approved, routed_to) in expect {
            let r = route(&intent(kind, resilient()), &cfg);
            assert_eq!(
                (r.tier.number(), r.status, r.approved, r.routed_to),
                (tier, status, approved, routed_to),
                "{kind}"
            );
        }
    }

    #[test]
    fn contract_example_alignment() {
        let r = route(
            &intent("self_improve", resilient()),
            &GovernanceConfig::default(),
        );
        assert_eq!(r.alignment, 0.9);
        assert_eq!(
            r.reasoning[0],
            "Tier 3: high impact, unified logic vote required (quorum 2 of 3)"
        );
        assert!(
            r.reasoning[1].starts_with("Mission alignment 0.90 (resilience)"),
            "{:?}",
            r.reasoning
        );
    }

    #[test]
    fn unknown_type_gets_default_tier_with_reason() {
        let r = route(
            &intent("launch_rocket", resilient()),
            &GovernanceConfig::default(),
        );
        assert_eq!(r.tier, Tier::HumanRequired);
        assert!(r.reasoning[0].contains("Unknown intent type \"launch_rocket\": default tier 0"));
        let cfg = GovernanceConfig {
            default_tier: 2,
            ..Default::default()
        };
        assert_eq!(
            route(&intent("launch_rocket", resilient()), &cfg).status,
            IntentStatus::Queued
        );
    }

    #[test]
    fn low_alignment_escalates_tier_1_and_2_only() {
        let cfg = GovernanceConfig::default();
        // modify_config: base 0.4 × unstated 0.5 = 0.20 < 0.25.
        let r = route(&intent("modify_config", MissionContext::default()), &cfg);
        assert_eq!(r.alignment, 0.2);
        assert_eq!(
            (r.status, r.approved, r.routed_to),
            (IntentStatus::PendingReview, false, "human_review_queue")
        );
        assert_eq!(
            r.tier,
            Tier::ReviewRequired,
            "the tier is kept, the routing changes"
        );
        assert_eq!(r.review, Some(ReviewKind::LowAlignment));
        assert!(
            r.reasoning
                .iter()
                .any(|l| l.contains("below min_alignment 0.25"))
        );
        // The same with a stated pillar passes: 0.4 × 0.7 = 0.28.
        let autonomy = MissionContext {
            autonomy_impact: true,
            ..Default::default()
        };
        assert_eq!(
            route(&intent("modify_config", autonomy), &cfg).status,
            IntentStatus::Queued
        );
        // Tier 0 and 3 are not affected by alignment.
        let cfg_strict = GovernanceConfig {
            min_alignment: 1.0,
            ..Default::default()
        };
        assert_eq!(
            route(&intent("self_improve", resilient()), &cfg_strict).status,
            IntentStatus::PendingVote
        );
    }

    #[test]
    fn an_unprivileged_emergency_goes_to_a_human_and_a_high_priority_is_refused() {
        let cfg = GovernanceConfig::default();
        let mut high = intent("query_knowledge", resilient());
        high.priority = 9;
        let mut route = super::route(&high, &cfg);
        let err =
            earn(&mut route, &high, Privilege::Unprivileged, "agent", &cfg).expect_err("refused");
        assert!(err.contains("max_unprivileged_priority"), "{err}");
        assert!(earn(&mut route, &high, Privilege::Privileged, "svc", &cfg).is_ok());

        for (kind, ctx) in [
            ("critical_incident", MissionContext::default()),
            (
                "query_knowledge",
                MissionContext {
                    emergency: true,
                    ..Default::default()
                },
            ),
        ] {
            let claim = intent(kind, ctx);
            let mut route = super::route(&claim, &cfg);
            earn(&mut route, &claim, Privilege::Unprivileged, "agent", &cfg).expect("reviewed");
            assert_eq!(route.status, IntentStatus::PendingReview, "{kind}");
            assert!(!route.approved);
            assert_eq!(route.review, Some(ReviewKind::Approval));
            assert_eq!(route.priority, claim.priority, "no emergency priority");
            let mut privileged = super::route(&claim, &cfg);
            earn(
                &mut privileged,
                &claim,
                Privilege::Privileged,
                "operator",
                &cfg,
            )
            .expect("ok");
            assert_eq!(privileged.status, IntentStatus::Queued, "{kind}");
        }
    }

    #[test]
    fn emergency_goes_to_top_priority() {
        let r = route(
            &intent("critical_incident", MissionContext::default()),
            &GovernanceConfig::default(),
        );
        assert_eq!((r.priority, r.alignment), (EMERGENCY_PRIORITY, 0.5));
        let ctx = MissionContext {
            emergency: true,
            ..Default::default()
        };
        assert_eq!(
            route(
                &intent("query_knowledge", ctx),
                &GovernanceConfig::default()
            )
            .alignment,
            1.0
        );
    }

    proptest! {
        #[test]
        fn alignment_is_bounded_and_monotone_in_pillar_weight(
            base in 0.0f64..=1.0, r in any::<bool>(), v in any::<bool>(), a in any::<bool>(), l in any::<bool>()
        ) {
            let cfg = GovernanceConfig::default();
            let ctx = MissionContext { resilience_impact: r, revenue_impact: v, autonomy_impact: a, learning_impact: l, ..Default::default() };
            let (score, _) = alignment(&intent("x", ctx.clone()), base, &cfg);
            prop_assert!((0.0..=1.0).contains(&score));
            // Adding resilience (the heaviest pillar) never lowers the score.
            let more = MissionContext { resilience_impact: true, ..ctx };
            prop_assert!(alignment(&intent("x", more), base, &cfg).0 >= score);
        }

        #[test]
        fn only_tiers_1_2_4_are_approved(kind in "[a-z_]{1,20}", prio in 0u8..=9) {
            let mut i = intent(&kind, resilient());
            i.priority = prio;
            let r = route(&i, &GovernanceConfig::default());
            prop_assert_eq!(r.approved, r.status == IntentStatus::Queued);
            prop_assert_eq!(r.requires_vote, r.status == IntentStatus::PendingVote);
            prop_assert!(r.priority <= 9);
        }
    }
}
