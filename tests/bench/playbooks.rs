//! `scripts/bench playbooks`: how fast remediation starts and how much the sandbox costs.
//!
//! 1. Incident to first step: an incident is published into `BULWARK_MESH` and the clock stops
//!    when the run's first `mesh.playbook.step` event arrives (the step ran and was announced).
//!    Next to it, raw NATS in the same run: a JetStream publish read back by a pull consumer and
//!    re-published on a core subject (the same hops without the runner).
//! 2. Script evaluations per second: a whole playbook run (the shared hardened engine with its
//!    deadline and host set for the run, parameters converted, one step called, result read
//!    back, the run's record built) next to a bare Rhai call of the same function on a default
//!    engine with the AST compiled once.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulwark_common::envelope::MeshEvent;
use bulwark_common::subjects;
use bulwark_playbooks::host::Requester;
use bulwark_playbooks::playbook::Library;
use bulwark_playbooks::runner::{self, Plan, Settings};
use bulwark_playbooks::sandbox::{Limits, Packages};
use bulwark_tests::{NatsServer, start_playbooks};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

const PLAYBOOK: &str = r#"
fn playbook() {
    #{ name: "bench_first_step", triggers: ["event.incident"], params: #{ target: "string", n: "int" },
       forward: ["target", "n"], defaults: #{ n: 1 }, resource: "target", slo_s: 10, cooldown_s: 0,
       steps: ["first"] }
}
fn first(p) { let x = p.n * 2 + 1; #{ x: x } }
"#;

/// The evaluation benchmark makes no host calls; this requester refuses any.
struct NoHost;

impl Requester for NoHost {
    fn request(&self, subject: &str, _body: Value) -> Result<Value, String> {
        Err(format!("{subject}: no host in this benchmark"))
    }
}

/// Runs the playbooks benchmark; `smoke` keeps it to a few seconds.
pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let incidents: u64 = if smoke { 50 } else { 2_000 };
    let evaluations: u64 = if smoke { 2_000 } else { 100_000 };
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("bench_first_step.rhai"), PLAYBOOK)?;

    let server = NatsServer::start();
    println!(
        "bench playbooks: nats-server {}, {incidents} incidents one at a time, {evaluations} evaluations",
        server.url()
    );
    let mut cfg = server.config();
    cfg.playbooks.dir = dir.path().display().to_string();
    let _runner = start_playbooks(cfg.clone()).await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());

    // Raw: JetStream publish -> pull consumer -> core publish -> subscriber.
    let raw_stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_RAW_INCIDENTS".into(),
            subjects: vec!["bench.incident".into()],
            ..Default::default()
        })
        .await?;
    let consumer = raw_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ..Default::default()
        })
        .await?;
    let relay_client = client.clone();
    let relay = tokio::spawn(async move {
        let mut messages = consumer.messages().await?;
        while let Some(Ok(msg)) = messages.next().await {
            relay_client
                .publish("bench.step", msg.payload.clone())
                .await?;
            let _ = msg.ack().await;
        }
        anyhow::Ok(())
    });
    let mut steps = client.subscribe("bench.step").await?;
    let mut raw = Histogram::<u64>::new(3)?;
    for i in 0..incidents {
        let start = Instant::now();
        js.publish("bench.incident", format!("{i}").into())
            .await?
            .await?;
        tokio::time::timeout(Duration::from_secs(10), steps.next())
            .await
            .context("raw relay answered")?;
        raw.record(start.elapsed().as_micros() as u64)?;
    }
    relay.abort();

    // bulwark: incident -> playbooks runner -> first step event.
    let mut step_events = client.subscribe(subjects::mesh("playbook.step")).await?;
    client.flush().await?;
    let mut runs = Histogram::<u64>::new(3)?;
    for i in 0..incidents {
        let event = MeshEvent::root(
            "event.incident",
            "bench",
            json!({"playbook": "bench_first_step", "target": format!("t{i}")}),
        );
        let start = Instant::now();
        js.publish(subjects::MESH_INCIDENT, serde_json::to_vec(&event)?.into())
            .await?
            .await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), step_events.next())
                .await
                .context("the first step ran")?
                .context("subscription open")?;
            let step: Value = serde_json::from_slice(&msg.payload)?;
            if step["payload"]["params"]["target"] == format!("t{i}").as_str() {
                break;
            }
        }
        runs.record(start.elapsed().as_micros() as u64)?;
    }
    println!("incident published -> first step executed and announced:");
    crate::print_latency("raw NATS (JetStream + relay)", &raw);
    crate::print_latency("bulwark playbooks", &runs);
    println!(
        "  ratio p50 raw/bulwark {:.2}   (aim: p99 <= 5 ms; measured {:.3} ms)",
        raw.value_at_quantile(0.5) as f64 / runs.value_at_quantile(0.5).max(1) as f64,
        runs.value_at_quantile(0.99) as f64 / 1000.0
    );

    // Evaluations per second: bare Rhai vs a whole sandboxed run.
    let bare_engine = rhai::Engine::new();
    let bare_ast = bare_engine.compile("fn first(p) { let x = p.n * 2 + 1; #{ x: x } }")?;
    let start = Instant::now();
    for i in 0..evaluations {
        let mut p = rhai::Map::new();
        p.insert("n".into(), rhai::Dynamic::from(i as i64));
        let _: rhai::Dynamic =
            bare_engine.call_fn(&mut rhai::Scope::new(), &bare_ast, "first", (p,))?;
    }
    let bare = evaluations as f64 / start.elapsed().as_secs_f64();

    let library = Library::load(dir.path(), &Packages::new(), &Limits::from(&cfg.playbooks));
    let playbook = library
        .playbooks
        .get("bench_first_step")
        .cloned()
        .context("bench playbook loads")?;
    let settings = Settings::new(
        &Packages::new(),
        Limits::from(&cfg.playbooks),
        1.0,
        1.0,
        10.0,
    );
    let requester: Arc<dyn Requester> = Arc::new(NoHost);
    let start = Instant::now();
    for i in 0..evaluations {
        let plan = Plan {
            playbook: playbook.clone(),
            params: json!({"target": "t", "n": i})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            run_id: "bench".into(),
            dry_run: false,
        };
        let outcome = runner::execute(
            &plan,
            &settings,
            requester.clone(),
            Arc::new(AtomicBool::new(false)),
            &|_| {},
        );
        if outcome.error.is_some() {
            anyhow::bail!("bench run failed: {:?}", outcome.error);
        }
    }
    let sandboxed = evaluations as f64 / start.elapsed().as_secs_f64();
    println!("script evaluations per second (same function, same machine, same run):");
    println!("  bare Rhai (Engine::new, compiled once)   {bare:>12.0} /s");
    println!("  bulwark sandboxed run (whole run)        {sandboxed:>12.0} /s");
    println!("  ratio bulwark/bare {:.2}", sandboxed / bare);
    Ok(())
}
