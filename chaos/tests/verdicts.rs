//! The runner's verdicts against a real stack: a scenario whose safeguard is deliberately
//! disabled (the storm guard's thresholds raised out of reach) FAILS, and the evidence names
//! the safeguards that never fired while the checker still finds nothing lost.

use bulwark_chaos::runner::{self, Options, Verdict};
use bulwark_chaos::scenario::{self, AtLeastOne, Injection, Seconds};

fn storm_scenario() -> scenario::Scenario {
    let dir = bulwark_chaos::scenarios_dir();
    scenario::load_file(&dir.join("L2_trigger_mesh_storm.toml"))
        .expect("the storm scenario loads")
        .scenario
}

/// The scenario's flood rate (250 events/s on each of 20 types) for 2 s, and a short calm
/// control, so the test stays quick.
fn shortened(mut s: scenario::Scenario) -> scenario::Scenario {
    for (method, rate) in [(&mut s.method, 5000), (&mut s.control.method, 40)] {
        for i in method.iter_mut() {
            if let Injection::PublishEvents {
                rate_per_s,
                duration_s,
                ..
            } = i
            {
                *rate_per_s = AtLeastOne(rate);
                *duration_s = Seconds(2.0);
            }
        }
    }
    s.recovery_limit_s = Seconds(60.0);
    s
}

fn system(s: &mut scenario::Scenario, toml_text: &str) {
    let extra: toml::Table = toml::from_str(toml_text).expect("toml");
    for (k, v) in extra {
        s.system.insert(k, v);
    }
}

fn options() -> Options {
    Options {
        external: false,
        quick: false,
        seed: 42,
        cfg: bulwark_common::BulwarkConfig::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_with_the_storm_guard_disabled_fails_naming_the_silent_safeguards() {
    let mut s = shortened(storm_scenario());
    // The safeguard is there but blind: thresholds no flood reaches.
    system(
        &mut s,
        "[mesh]\nstorm_threshold = 10000000\nbreaker_threshold = 100000000\n[telemetry]\ninterval_s = 1.0\n",
    );
    let r = runner::run_scenario(&s, &options()).await;
    assert_eq!(r.verdict, Verdict::Fail, "{:#?}", r.scenario.reasons);
    assert_eq!(r.control.verdict, Verdict::Pass, "{:#?}", r.control.reasons);
    let reasons = r.scenario.reasons.join("\n");
    for silent in [
        "storm detector",
        "circuit breaker",
        "rate limiter (throttle advisory)",
    ] {
        assert!(
            reasons.contains(&format!("{silent}: never fired")),
            "{silent} is named as never fired:\n{reasons}"
        );
    }
    // The failure is the safeguards', not the mesh's: every event was processed once.
    let check = &r.scenario.check;
    assert!(check.valid(), "{}", check.summary());
    assert_eq!(check.sent, 10000, "{}", check.summary());
    assert_eq!(check.ok, 10000, "{}", check.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_storm_with_the_guard_enabled_passes() {
    let mut s = shortened(storm_scenario());
    system(
        &mut s,
        "[mesh]\ncooldown_s = 3.0\nhalf_open_s = 1.0\n[telemetry]\ninterval_s = 1.0\n",
    );
    for e in &mut s.expectations {
        if e.safeguard == "breaker closes again" {
            e.within_s = Some(Seconds(30.0));
        }
    }
    let r = runner::run_scenario(&s, &options()).await;
    assert_eq!(
        r.verdict,
        Verdict::Pass,
        "{:#?} {:#?}",
        r.scenario.reasons,
        r.control.reasons
    );
    let storm = r
        .scenario
        .safeguards
        .iter()
        .find(|g| g.safeguard == "storm detector")
        .expect("judged");
    assert!(storm.first_value.is_some_and(|v| v > 100.0), "{storm:?}");
    assert_eq!(r.scenario.check.lost, 0);
}
