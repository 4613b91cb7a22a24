//! `bulwark up` against a JetStream that answers only after a delay (issue 15, item 2): a
//! three-node cluster of which one node runs, so JetStream has no leader and every stream and
//! bucket request times out, exactly what a user starting a cluster by hand sees first. The
//! services retry with backoff and say so; once the other nodes join, they start, and `bulwark
//! up` reports itself up. Before, the first `JetStream ... is not available: jetstream request timed
//! out` stopped the whole `bulwark up`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead};

use bulwark_tests::{NatsCluster, eventually};

/// Collects the lines of `pipe` as they come.
fn collect(pipe: impl AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(pipe).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().expect("lines").push(line);
        }
    });
    lines
}

fn any(lines: &Arc<Mutex<Vec<String>>>, want: impl Fn(&str) -> bool) -> bool {
    lines.lock().expect("lines").iter().any(|l| want(l))
}

fn text(lines: &Arc<Mutex<Vec<String>>>) -> String {
    lines.lock().expect("lines").join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_waits_for_a_jetstream_that_answers_late_and_then_serves() {
    bulwark_tests::init_logging();
    let mut cluster = NatsCluster::start(3).await;
    let url = cluster.url();
    cluster.kill(1);
    cluster.kill(2);

    let dir = tempfile::tempdir().expect("tmp");
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["up", "--workers", "1", "--nats-url", &url])
        .env_remove("BULWARK_CONFIG")
        .env("BULWARK_LOG", "warn")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bulwark up starts");
    let stdout = collect(up.stdout.take().expect("stdout"));
    let stderr = collect(up.stderr.take().expect("stderr"));

    // It says it is retrying, and it keeps running.
    eventually(Duration::from_secs(90), "a retry reported", || async {
        any(&stderr, |l| {
            l.contains("retrying") && l.contains("is not available")
        })
        .then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "the services named as waiting",
        || async {
            any(&stdout, |l| {
                l.contains("waiting") && l.contains("governance")
            })
            .then_some(())
        },
    )
    .await;
    assert!(
        up.try_wait().expect("status").is_none(),
        "bulwark up stopped on an unavailable JetStream:\n{}\n{}",
        text(&stdout),
        text(&stderr)
    );

    // The other nodes join: JetStream elects a leader and can place three replicas (with one
    // node still missing, a new R3 stream answers `stream is offline`, also retried), the
    // services start, bulwark is up.
    cluster.restart(1).await;
    cluster.restart(2).await;
    let came_up = tokio::time::timeout(Duration::from_secs(180), async {
        while !any(&stdout, |l| l.contains("bulwark: up on")) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if let Some(pid) = up.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), up.wait()).await;
    assert!(
        came_up.is_ok(),
        "bulwark up did not come up after JetStream did; stdout:\n{}\nstderr:\n{}",
        text(&stdout),
        text(&stderr)
    );
    assert!(
        any(&stdout, |l| l.contains("ready  storm_guard")),
        "{}",
        text(&stdout)
    );
}
