//! What a run leaves behind in its report directory: `journal.json` (every figure of every
//! phase, the timelines included), `report.md` (for a person: verdicts, the safeguards with when
//! and at what value they fired, the checker's counts, latencies, the injections) and one SVG
//! chart per scenario (event and intent rates, queue depth, breaker open, safeguard firings).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::runner::{PhaseResult, ScenarioResult};

/// Files written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The JSON journal.
    pub journal: PathBuf,
    /// The Markdown report.
    pub report: PathBuf,
}

/// Writes the journal, the report and the charts into `dir` (created when missing).
pub fn write(dir: &Path, results: &[ScenarioResult], command: &str) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let journal = dir.join("journal.json");
    let body = serde_json::json!({
        "command": command,
        "written_at": bulwark_common::time::now(),
        "all_passed": results.iter().all(|r| r.verdict == crate::runner::Verdict::Pass),
        "scenarios": results,
    });
    std::fs::write(&journal, serde_json::to_string_pretty(&body)?)
        .with_context(|| format!("writing {}", journal.display()))?;
    for r in results {
        let svg = chart(&r.scenario, &format!("{} (scenario)", r.id));
        std::fs::write(dir.join(format!("{}.svg", r.id)), svg)?;
        let svg = chart(&r.control, &format!("{} (control)", r.id));
        std::fs::write(dir.join(format!("{}.control.svg", r.id)), svg)?;
    }
    let report = dir.join("report.md");
    std::fs::write(&report, markdown(results, command))
        .with_context(|| format!("writing {}", report.display()))?;
    Ok(Written { journal, report })
}

/// The Markdown report.
pub fn markdown(results: &[ScenarioResult], command: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# bulwark chaos report\n");
    let _ = writeln!(md, "Command: `{command}`  ");
    if let Some(first) = results.first() {
        let _ = writeln!(
            md,
            "Mode: {}{}, seed {} (replay with `--seed {}`)\n",
            first.mode,
            if first.quick { ", --quick" } else { "" },
            first.seed,
            first.seed
        );
    }
    let _ = writeln!(
        md,
        "| scenario | sev | verdict | safeguards | checker | completion p99 | recovery |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for r in results {
        let s = &r.scenario;
        let fired = s.safeguards.iter().filter(|g| g.ok).count();
        let _ = writeln!(
            md,
            "| [{}](#{}) | {} | **{}** | {}/{} as expected | {} | {} | {} |",
            r.id,
            r.id.to_lowercase(),
            r.severity,
            r.verdict.as_str(),
            fired,
            s.safeguards.len(),
            s.check.summary(),
            s.completion_latency
                .as_ref()
                .map(|p| format!("{} ms", p.p99_ms))
                .unwrap_or_else(|| "-".into()),
            s.recovery_s
                .map(|x| format!("{x:.1} s / {:.0} s", s.recovery_limit_s))
                .unwrap_or_else(|| format!("not within {:.0} s", s.recovery_limit_s)),
        );
    }
    for r in results {
        let _ = writeln!(md, "\n## {}\n", r.id);
        let _ = writeln!(
            md,
            "**{}** (category {}, severity {}). {}\n",
            r.verdict.as_str(),
            r.category,
            r.severity,
            r.description.trim()
        );
        phase_md(&mut md, &r.scenario, &format!("{}.svg", r.id));
        phase_md(&mut md, &r.control, &format!("{}.control.svg", r.id));
    }
    md
}

fn phase_md(md: &mut String, p: &PhaseResult, chart: &str) {
    let _ = writeln!(
        md,
        "### {}: {} (run {}, {:.1} s)\n",
        p.phase,
        p.verdict.as_str(),
        p.run_id,
        p.duration_s
    );
    if !p.reasons.is_empty() {
        let _ = writeln!(md, "Why not a pass:\n");
        for r in &p.reasons {
            let _ = writeln!(md, "- {r}");
        }
        let _ = writeln!(md);
    }
    if !p.safeguards.is_empty() {
        let _ = writeln!(
            md,
            "| safeguard | expected | fired | first at | value | limit | ok |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for g in &p.safeguards {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                g.safeguard,
                g.expectation,
                g.count,
                g.first_t_s
                    .map(|t| format!("{t:.1} s ({:.1} s after its cause)", t - g.after_start_s))
                    .unwrap_or_else(|| "-".into()),
                g.first_value
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                g.within_s
                    .map(|w| format!("{w:.0} s"))
                    .unwrap_or_else(|| "-".into()),
                if g.ok { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "Evidence:\n");
    for e in &p.evidence {
        let _ = writeln!(md, "- {e}");
    }
    if !p.check.examples.is_empty() {
        let _ = writeln!(md, "- checker examples: `{:?}`", p.check.examples);
    }
    let _ = writeln!(md, "\nInjections:\n");
    for i in &p.injections {
        let _ = writeln!(
            md,
            "- `{}` ({}) {:.1}-{:.1} s: `{}`{}",
            i.label,
            i.kind,
            i.started_s,
            i.ended_s,
            i.figures,
            i.inconclusive
                .as_ref()
                .map(|w| format!(" **inconclusive: {w}**"))
                .unwrap_or_default()
        );
    }
    if !p.timeline.is_empty() {
        let _ = writeln!(md, "\n![timeline]({chart})\n");
    }
}

/// An SVG chart of the phase's timeline: event and intent rates (left axis), queue depth
/// (right axis), breaker-open stretches shaded, safeguard firings marked.
pub fn chart(p: &PhaseResult, title: &str) -> String {
    let (w, h) = (900.0, 320.0);
    let (left, right, top, bottom) = (60.0, 60.0, 30.0, 40.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let samples = &p.timeline;
    let t_max = samples.iter().map(|s| s.t_s).fold(1.0, f64::max);
    let t_min = samples.iter().map(|s| s.t_s).fold(0.0, f64::min);
    let rate_max = samples
        .iter()
        .map(|s| s.events_per_s.max(s.intents_per_s).max(s.processed_per_s))
        .fold(1.0, f64::max);
    let q_max = samples
        .iter()
        .filter_map(|s| s.queue_depth)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |t: f64| left + (t - t_min) / (t_max - t_min).max(0.001) * pw;
    let y_rate = |r: f64| top + ph - r / rate_max * ph;
    let y_q = |q: f64| top + ph - q / q_max * ph;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        svg,
        r#"<text x="{left}" y="18" font-size="13" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Breaker open (or half-open) stretches.
    let mut open_from: Option<f64> = None;
    for s in samples {
        let open = matches!(s.breaker.as_deref(), Some("open") | Some("half_open"));
        match (open, open_from) {
            (true, None) => open_from = Some(s.t_s),
            (false, Some(from)) => {
                let _ = write!(
                    svg,
                    r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#f8d7da"/>"##,
                    x(from),
                    (x(s.t_s) - x(from)).max(1.0)
                );
                open_from = None;
            }
            _ => {}
        }
    }
    if let Some(from) = open_from {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#f8d7da"/>"##,
            x(from),
            (x(t_max) - x(from)).max(1.0)
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let line = |svg: &mut String, points: Vec<(f64, f64)>, colour: &str, dash: &str| {
        if points.len() < 2 {
            return;
        }
        let d: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{dash}" points="{}"/>"#,
            d.join(" ")
        );
    };
    line(
        &mut svg,
        samples
            .iter()
            .map(|s| (x(s.t_s), y_rate(s.events_per_s)))
            .collect(),
        "#1f77b4",
        "",
    );
    line(
        &mut svg,
        samples
            .iter()
            .map(|s| (x(s.t_s), y_rate(s.processed_per_s)))
            .collect(),
        "#17becf",
        "4 2",
    );
    line(
        &mut svg,
        samples
            .iter()
            .map(|s| (x(s.t_s), y_rate(s.intents_per_s)))
            .collect(),
        "#2ca02c",
        "",
    );
    line(
        &mut svg,
        samples
            .iter()
            .filter_map(|s| s.queue_depth.map(|q| (x(s.t_s), y_q(q as f64))))
            .collect(),
        "#d62728",
        "",
    );
    // Safeguard firings.
    for (i, g) in p.safeguards.iter().enumerate() {
        if let Some(t) = g.first_t_s {
            let xx = x(t);
            let _ = write!(
                svg,
                r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#9467bd" stroke-dasharray="3 3"/><text x="{:.1}" y="{:.1}" fill="#9467bd">{}</text>"##,
                top + ph,
                xx + 3.0,
                top + 12.0 + 12.0 * i as f64,
                escape(&g.safeguard)
            );
        }
    }
    // Axes.
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{rate_max:.0}/s</text><text x="{:.1}" y="{:.1}" text-anchor="end">0</text>"##,
        left - 4.0,
        top + 10.0,
        left - 4.0,
        top + ph
    );
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" fill="#d62728">{q_max:.0} queued</text>"##,
        left + pw + 4.0,
        top + 10.0
    );
    let _ = write!(
        svg,
        r##"<text x="{left}" y="{:.1}">{t_min:.0} s</text><text x="{:.1}" y="{:.1}" text-anchor="end">{t_max:.0} s</text>"##,
        top + ph + 15.0,
        left + pw,
        top + ph + 15.0
    );
    let legend = [
        ("#1f77b4", "events published/s"),
        ("#17becf", "events processed/s (checker)"),
        ("#2ca02c", "intents answered/s"),
        ("#d62728", "queue depth"),
        ("#f8d7da", "breaker open"),
    ];
    for (i, (colour, text)) in legend.iter().enumerate() {
        let lx = left + i as f64 * 165.0;
        let ly = h - 10.0;
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{ly}">{text}</text>"#,
            ly - 9.0,
            lx + 14.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
