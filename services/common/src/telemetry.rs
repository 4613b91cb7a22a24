//! The periodic heartbeat of a component: `telemetry.<component>` every `interval`, with the
//! figures the component's `snapshot` function returns (CONTRACT section 5). The watchdog reads
//! these; a component that stops publishing is presumed dead.
//! A snapshot of `null` skips that beat (a standby replica whose figures would mislead).

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::subjects;

/// Publishes `snapshot()` on `telemetry.<component>` every `interval` until `shutdown`, starting
/// at once. The `component` and `timestamp` keys are added to the object.
pub fn spawn(
    client: async_nats::Client,
    component: &str,
    interval: Duration,
    shutdown: CancellationToken,
    snapshot: impl Fn() -> Value + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let subject = subjects::telemetry(component);
    let component = component.to_owned();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let mut figures = snapshot();
            if figures.is_null() {
                continue;
            }
            if let Value::Object(map) = &mut figures {
                map.insert("component".into(), Value::String(component.clone()));
                map.insert("timestamp".into(), Value::String(crate::time::now()));
            }
            let body = crate::api::to_bytes(&figures);
            let sent =
                crate::connect::publish_flushed(&client, subject.clone(), body, interval).await;
            if let Err(err) = sent {
                tracing::debug!(component = %component, error = %err, "telemetry not sent");
            }
        }
    })
}
