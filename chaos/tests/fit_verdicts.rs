//! FIT03 and FIT02 against a real stack with a safeguard disabled: each FAILS naming the
//! safeguards that never fired, while the checker still finds every acknowledged intent
//! completed exactly once. FIT03: with the scheduler's shedding limit at 0 (no priority may be
//! shed) the overload still raises the shedding incident, but nothing is parked, and every
//! critical intent is still served. FIT02: with the watchdog asleep the dependency outages go
//! unannounced, and queue persistence still brings every intent through. And FIT03 with a ramp
//! the slots take is INCONCLUSIVE, not FAIL: its method did not reach its stress.

mod common;

use bulwark_chaos::runner::{self, Phase, Verdict};
use bulwark_chaos::scenario::Injection;
use common::{assert_fails_naming, injection, load, options, quick_system};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_with_shedding_disabled_fails_naming_the_shedding() {
    let mut s = load("FIT03_combined_load_chaos");
    // Shedding is there but may take no priority at all: the playbook's request is refused.
    quick_system(&mut s, "[scheduler]\nshed_below_priority = 0\n");
    let r = runner::run_scenario(&s, &options(true)).await;
    assert_fails_naming(
        &r,
        &[
            "load shedding (tasks parked)",
            "self-healing resumed (shedding decision)",
        ],
    );
    assert_eq!(
        r.control.verdict,
        Verdict::Pass,
        "the control is unaffected: {:#?}",
        r.control.reasons
    );
    let guard = r
        .scenario
        .safeguards
        .iter()
        .find(|g| g.safeguard == "queue guard (shedding incident)")
        .expect("the guard is judged");
    assert!(
        guard.ok,
        "the overload still raised the incident: {}",
        guard.detail
    );
    // Nothing was parked, and nothing acknowledged was lost or run twice.
    let check = &r.scenario.check;
    assert!(check.valid(), "{}", check.summary());
    assert_eq!(check.parked, 0, "{}", check.summary());
    assert_eq!(r.scenario.intent_fates.ever_parked, 0);
    let fates = &r.scenario.intent_fates;
    assert!(
        fates.critical > 0 && fates.critical_completed == fates.critical,
        "every critical intent served: {fates:?}"
    );
    let ramp = injection(&r, "ramp_intents");
    assert!(
        ramp.figures["offered"].as_u64().is_some_and(|n| n > 1000),
        "the journal says what the ramp offered: {:?}",
        ramp.figures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_outages_with_the_watchdog_asleep_fail_naming_it() {
    let mut s = load("FIT02_dependency_chaos");
    // The watchdog sweeps once at its start and then not again within the run.
    quick_system(&mut s, "[watchdog]\ncheck_interval_s = 100000.0\n");
    let r = runner::run_scenario(&s, &options(true)).await;
    assert_fails_naming(
        &r,
        &[
            "watchdog notices a dependency down",
            "watchdog announces the recovery",
        ],
    );
    // The outages happened as planned (seeded), and queue persistence still held.
    let outages = injection(&r, "random_outage");
    assert_eq!(
        outages.figures["outages"].as_array().map(Vec::len),
        Some(4),
        "{:?}",
        outages.figures
    );
    let check = &r.scenario.check;
    assert!(check.valid(), "{}", check.summary());
    assert!(
        check.sent > 0 && check.ok == check.sent,
        "{}",
        check.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_below_capacity_is_inconclusive_not_a_failure_of_the_guard() {
    let mut s = load("FIT03_combined_load_chaos").quick();
    // 2 -> 5 intents per second of 240 ms on 24 slots: at most 0.05x what they run, so the
    // queue never nears the guard's depth and the safeguards have nothing to act on.
    for i in &mut s.method {
        if let Injection::RampIntents {
            from_per_s,
            to_per_s,
            ..
        } = i
        {
            from_per_s.0 = 2;
            to_per_s.0 = 5;
        }
    }
    let r = runner::run_phase(&s, Phase::Scenario, &options(true), 42).await;
    assert_eq!(r.verdict, Verdict::Inconclusive, "{:#?}", r.reasons);
    let stress = &r.stresses[0];
    assert!(!stress.reached, "{stress:?}");
    assert!(
        stress.peak.is_some_and(|p| p < stress.at_least),
        "the peak is reported: {stress:?}"
    );
    let reasons = r.reasons.join("\n");
    assert!(
        reasons.contains("defect of the test design") && reasons.contains("NOT reached"),
        "named as a defect of the test design, with the numbers:\n{reasons}"
    );
    assert!(
        !reasons.contains("the checker found"),
        "nothing lost or duplicated: {}",
        r.check.summary()
    );
}
