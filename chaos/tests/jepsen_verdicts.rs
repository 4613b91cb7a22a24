//! JEPSEN04 against a real stack with its safeguard disabled: the writers read, modify and put
//! blindly instead of compare-and-set; the run FAILS, naming the history check that found lost
//! updates and the conflict refusals that never happened.

mod common;

use bulwark_chaos::runner;
use bulwark_chaos::scenario::Injection;
use common::{assert_fails_naming, load, options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_without_compare_and_set_fail_with_lost_updates() {
    let mut s = load("JEPSEN04_concurrent_write_conflict");
    let mut disabled = 0;
    for injection in s.method.iter_mut() {
        if let Injection::ConcurrentWrites { cas, .. } = injection {
            *cas = false;
            disabled += 1;
        }
    }
    assert_eq!(disabled, 1, "the scenario has its writers");
    let r = runner::run_scenario(&s, &options(true)).await;
    assert_fails_naming(
        &r,
        &[
            "compare-and-set refused stale writes",
            "history linearizable",
        ],
    );
}
