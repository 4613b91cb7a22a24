//! What the verdict tests share: a scenario from `chaos/scenarios`, its quick `[system]` with
//! a safeguard switched off, and the runner's options for a self-contained quick run.

// Each test file is its own crate and uses only part of this.
#![allow(dead_code)]

use bulwark_chaos::runner::Options;
use bulwark_chaos::scenario::{self, Scenario};

/// The scenario `id` as its file defines it.
pub fn load(id: &str) -> Scenario {
    let dir = bulwark_chaos::scenarios_dir();
    scenario::load_file(&dir.join(format!("{id}.toml")))
        .expect("the scenario loads")
        .scenario
}

/// Layers `toml_text` over the scenario's `[quick.system]` (a table's keys are merged).
pub fn quick_system(s: &mut Scenario, toml_text: &str) {
    let extra: toml::Table = toml::from_str(toml_text).expect("toml");
    for (section, v) in extra {
        match (s.quick.system.get_mut(&section), v) {
            (Some(toml::Value::Table(into)), toml::Value::Table(over)) => {
                into.extend(over);
            }
            (_, v) => {
                s.quick.system.insert(section, v);
            }
        }
    }
}

/// A self-contained run, quick or not, with a fixed seed.
pub fn options(quick: bool) -> Options {
    Options {
        external: false,
        quick,
        seed: 42,
        cfg: bulwark_common::BulwarkConfig::default(),
    }
}

/// The run FAILED, and its reasons name each safeguard of `silent` as never fired.
pub fn assert_fails_naming(r: &bulwark_chaos::runner::ScenarioResult, silent: &[&str]) {
    assert_eq!(
        r.verdict,
        bulwark_chaos::runner::Verdict::Fail,
        "{:#?}",
        r.scenario.reasons
    );
    // A FAIL, not an INCONCLUSIVE: the method reached every stress the safeguards need.
    for st in &r.scenario.stresses {
        assert!(st.reached, "the method reached its stress: {st:?}");
    }
    let reasons = r.scenario.reasons.join("\n");
    for name in silent {
        assert!(
            reasons.contains(&format!("{name}: never fired")),
            "{name} is named as never fired:\n{reasons}"
        );
    }
}

/// The report of the scenario phase's injection of `kind` (it must have run).
pub fn injection<'a>(
    r: &'a bulwark_chaos::runner::ScenarioResult,
    kind: &str,
) -> &'a bulwark_chaos::inject::InjectionReport {
    r.scenario
        .injections
        .iter()
        .find(|i| i.kind == kind)
        .unwrap_or_else(|| panic!("the {kind} injection ran"))
}
