//! Queue guards: a queue depth crossing its warning or critical threshold raises one alert per
//! crossing (not one per check); falling back below the warning threshold re-arms it.

/// Where a guarded figure stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below the warning threshold.
    Normal,
    /// At or above the warning threshold.
    Warning,
    /// At or above the critical threshold.
    Critical,
}

impl Level {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// A threshold pair with memory of the last level.
#[derive(Debug, Clone)]
pub struct Guard {
    warn: u64,
    critical: u64,
    level: Level,
}

impl Guard {
    /// A guard at `warn` / `critical`.
    pub fn new(warn: u64, critical: u64) -> Self {
        Guard {
            warn,
            critical,
            level: Level::Normal,
        }
    }

    /// The level for `value`; `Some(level)` only when it changed since the last observation.
    pub fn observe(&mut self, value: u64) -> Option<Level> {
        let level = if value >= self.critical {
            Level::Critical
        } else if value >= self.warn {
            Level::Warning
        } else {
            Level::Normal
        };
        (level != self.level).then(|| {
            self.level = level;
            level
        })
    }

    /// The current level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The threshold of `level`.
    pub fn threshold(&self, level: Level) -> u64 {
        match level {
            Level::Critical => self.critical,
            _ => self.warn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_alert_per_crossing() {
        let mut g = Guard::new(500, 2000);
        assert_eq!(g.observe(10), None);
        assert_eq!(g.observe(600), Some(Level::Warning));
        assert_eq!(g.observe(700), None, "still warning: no repeat");
        assert_eq!(g.observe(2500), Some(Level::Critical));
        assert_eq!(g.observe(3000), None);
        assert_eq!(
            g.observe(100),
            Some(Level::Normal),
            "recovery is reported once"
        );
        assert_eq!(g.observe(2000), Some(Level::Critical));
    }
}
