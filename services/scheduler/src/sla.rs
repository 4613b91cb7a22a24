//! Queued-to-completed latency: percentiles over the current telemetry window, SLA breaches,
//! and throughput.

use hdrhistogram::Histogram;

/// Latency figures of one telemetry window, plus totals.
pub struct Latency {
    window: Histogram<u64>,
    sla_ms: u64,
    /// Tasks over the SLA since start.
    pub breaches: u64,
    /// Tasks completed since start.
    pub completed: u64,
    completed_in_window: u64,
}

impl Latency {
    /// Latency tracking against `sla_ms`.
    pub fn new(sla_ms: u64) -> Self {
        Latency {
            // 1 ms to 1 day, 2 significant digits: bounded memory.
            window: Histogram::new_with_bounds(1, 86_400_000, 2)
                .expect("constant bounds are valid"),
            sla_ms,
            breaches: 0,
            completed: 0,
            completed_in_window: 0,
        }
    }

    /// Records a completed task's latency; true when it breached the SLA.
    pub fn record(&mut self, ms: u64) -> bool {
        let _ = self.window.record(ms.max(1));
        self.completed += 1;
        self.completed_in_window += 1;
        let breach = ms > self.sla_ms;
        if breach {
            self.breaches += 1;
        }
        breach
    }

    /// `(p50_ms, p99_ms, completed_in_window)` of the window, then starts a new window.
    pub fn roll(&mut self) -> (u64, u64, u64) {
        let figures = if self.window.is_empty() {
            (0, 0, 0)
        } else {
            (
                self.window.value_at_quantile(0.5),
                self.window.value_at_quantile(0.99),
                self.completed_in_window,
            )
        };
        self.window.reset();
        self.completed_in_window = 0;
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaches_and_percentiles() {
        let mut l = Latency::new(1000);
        for ms in 1..=100 {
            assert!(!l.record(ms));
        }
        assert!(l.record(1500));
        assert_eq!((l.breaches, l.completed), (1, 101));
        let (p50, p99, n) = l.roll();
        assert!((49..=51).contains(&p50), "{p50}");
        assert!(p99 >= 99, "{p99}");
        assert_eq!(n, 101);
        assert_eq!(l.roll(), (0, 0, 0), "a new window");
    }
}
