//! The `resource_siege` injection (DIRT03): CPU and memory pressure on the machine the system
//! runs on. Busy-loop threads keep `cpu_threads` cores spinning, and one thread allocates
//! `memory_mb` in 16 MiB chunks and writes to every page so the memory is really resident.
//! Both are bounded (at most [`MAX_CPU_THREADS`] threads, and never more than half of the
//! memory the kernel reports available) and always released: the [`Siege`] guard stops and
//! joins the threads and frees the memory when it is dropped, whether the siege ran its course,
//! the injection was cancelled, or the run failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Busy-loop threads at most.
pub const MAX_CPU_THREADS: u64 = 64;
/// Bytes per allocation.
const CHUNK: usize = 16 << 20;
/// A page (every one is written to).
const PAGE: usize = 4096;

/// What a siege applied.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Applied {
    /// Busy-loop threads started.
    pub cpu_threads: u64,
    /// Memory asked for, MiB, after the bound.
    pub memory_mb: u64,
    /// Memory allocated and touched, MiB (at the end).
    pub touched_mb: u64,
    /// True when the memory asked for was cut to half of what was available.
    pub memory_capped: bool,
}

/// A running siege; dropping it ends it.
pub struct Siege {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    touched: Arc<AtomicU64>,
    applied: Applied,
}

/// `MemAvailable` of `/proc/meminfo`, MiB (`None` elsewhere).
pub fn available_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The bounded figures: threads at most [`MAX_CPU_THREADS`], memory at most half of
/// `available_mb` (when known).
pub fn bound(cpu_threads: u64, memory_mb: u64, available_mb: Option<u64>) -> (u64, u64, bool) {
    let cpu = cpu_threads.min(MAX_CPU_THREADS);
    match available_mb {
        Some(avail) if memory_mb > avail / 2 => (cpu, avail / 2, true),
        _ => (cpu, memory_mb, false),
    }
}

impl Siege {
    /// Starts the pressure.
    pub fn start(cpu_threads: u64, memory_mb: u64) -> Siege {
        let (cpu, mem, capped) = bound(cpu_threads, memory_mb, available_mb());
        let stop = Arc::new(AtomicBool::new(false));
        let touched = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..cpu {
            let stop = stop.clone();
            if let Ok(h) = std::thread::Builder::new()
                .name(format!("chaos-siege-cpu-{i}"))
                .spawn(move || {
                    let mut x: u64 = i;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    }
                })
            {
                threads.push(h);
            }
        }
        if mem > 0 {
            let stop = stop.clone();
            let touched = touched.clone();
            if let Ok(h) = std::thread::Builder::new()
                .name("chaos-siege-mem".into())
                .spawn(move || {
                    let want = (mem as usize) << 20;
                    let mut held: Vec<Vec<u8>> = Vec::new();
                    let mut total = 0usize;
                    while total < want && !stop.load(Ordering::Relaxed) {
                        let n = CHUNK.min(want - total);
                        let mut chunk = vec![0u8; n];
                        for b in chunk.iter_mut().step_by(PAGE) {
                            *b = 1;
                        }
                        std::hint::black_box(&chunk);
                        held.push(chunk);
                        total += n;
                        touched.store((total >> 20) as u64, Ordering::Relaxed);
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    drop(held);
                })
            {
                threads.push(h);
            }
        }
        Siege {
            stop,
            threads,
            touched,
            applied: Applied {
                cpu_threads: cpu,
                memory_mb: mem,
                touched_mb: 0,
                memory_capped: capped,
            },
        }
    }

    /// Ends it (stops and joins every thread, frees the memory) and says what was applied.
    pub fn end(mut self) -> Applied {
        self.release();
        self.applied
    }

    fn release(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        self.applied.touched_mb = self.touched.load(Ordering::Relaxed);
    }
}

impl Drop for Siege {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_siege_is_bounded() {
        assert_eq!(bound(1000, 100, Some(8000)), (MAX_CPU_THREADS, 100, false));
        assert_eq!(bound(2, 6000, Some(8000)), (2, 4000, true));
        assert_eq!(bound(2, 6000, None), (2, 6000, false));
    }

    #[test]
    fn the_siege_touches_its_memory_and_releases_everything() {
        let s = Siege::start(1, 32);
        let touched = s.touched.clone();
        while touched.load(Ordering::Relaxed) < 32 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let applied = s.end();
        assert_eq!(applied.touched_mb, 32);
        assert_eq!(applied.cpu_threads, 1);
        // Dropped without `end` (a cancelled injection): the threads still stop.
        let stop = {
            let s = Siege::start(1, 0);
            s.stop.clone()
        };
        assert!(stop.load(Ordering::Relaxed));
    }
}
