//! DIRT01 and DIRT03 against a real stack with their safeguard disabled: each FAILS, and the
//! evidence names the safeguard that never fired while the checker still finds nothing lost.

mod common;

use bulwark_chaos::runner;
use common::{assert_fails_naming, injection, load, options, quick_system};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_siege_with_the_queue_guard_blind_fails_naming_the_silent_safeguards() {
    let mut s = load("DIRT03_sustained_resource_siege");
    // The guard is there but blind: thresholds no queue reaches.
    quick_system(
        &mut s,
        "[scheduler]\nqueue_warn = 1000000\nqueue_critical = 2000000\n",
    );
    let r = runner::run_scenario(&s, &options(true)).await;
    assert_fails_naming(
        &r,
        &[
            "queue guard",
            "load shedding (incident)",
            "load shedding (playbook decision)",
        ],
    );
    let check = &r.scenario.check;
    assert!(check.valid(), "{}", check.summary());
    assert!(
        check.sent > 0 && check.ok == check.sent,
        "{}",
        check.summary()
    );
    let siege = injection(&r, "resource_siege");
    assert!(
        siege.figures["touched_mb"]
            .as_u64()
            .is_some_and(|mb| mb > 0),
        "the journal says what the siege applied: {:?}",
        siege.figures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_kill_without_the_pool_respawn_fails_naming_it() {
    let mut s = load("DIRT01_critical_kernel_kill");
    // The pool never brings the crashed workers back within the run, and the playbooks service
    // (whose worker recovery would respawn them on the "declared dead" incident) has an empty
    // library: it refuses every incident as naming an unknown playbook.
    let empty = tempfile::tempdir().expect("tempdir");
    quick_system(
        &mut s,
        &format!(
            "[worker]\nrespawn_delay_s = 100000.0\n[playbooks]\ndir = {:?}\n",
            empty.path().display().to_string()
        ),
    );
    s.quick.recovery_limit_s = Some(bulwark_chaos::scenario::Seconds(20.0));
    let r = runner::run_scenario(&s, &options(true)).await;
    assert_fails_naming(&r, &["pool recovery (respawn)"]);
    let reasons = r.scenario.reasons.join("\n");
    assert!(
        reasons.contains("pool_full") || reasons.contains("steady state"),
        "the steady state did not come back:\n{reasons}"
    );
}
