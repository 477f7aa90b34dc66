//! The proxy suite's results as an SVG bar chart: one panel per metric, a group of bars per service count, a bar
//! per target, heights as ratios to direct (the dashed line). Plain SVG text: a plotting crate would outweigh it.

use std::fmt::Write as _;

const PANEL_W: f64 = 360.0;
const PANEL_H: f64 = 240.0;
const MARGIN: f64 = 40.0;
const COLORS: [&str; 6] = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"];

/// `metrics`: (results.json key, title). `proxy`: the suite's `byServices` value.
pub fn svg(metrics: &[(&str, &str)], proxy: &serde_json::Value) -> String {
    let counts: Vec<&serde_json::Value> =
        proxy["byServices"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let mut targets: Vec<String> = Vec::new();
    for count in &counts {
        for r in count["results"].as_array().into_iter().flatten() {
            let name = r["target"].as_str().unwrap_or("?").to_owned();
            if !targets.contains(&name) {
                targets.push(name);
            }
        }
    }
    let ratio = |count: &serde_json::Value, target: &str, key: &str| {
        count["results"].as_array()?.iter().find(|r| r["target"] == target)?[key]["ratio"].as_f64()
    };
    let top = counts
        .iter()
        .flat_map(|c| targets.iter().flat_map(move |t| metrics.iter().filter_map(move |(k, _)| ratio(c, t, k))))
        .fold(1.2_f64, f64::max)
        .ceil();
    let width = MARGIN + metrics.len() as f64 * (PANEL_W + MARGIN);
    let height = PANEL_H + 3.0 * MARGIN + 20.0 * targets.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (m, (key, title)) in metrics.iter().enumerate() {
        let x0 = MARGIN + m as f64 * (PANEL_W + MARGIN);
        let y = |r: f64| MARGIN + PANEL_H * (1.0 - r / top);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14">{title} (x direct)</text>"#,
            x0 + PANEL_W / 2.0,
            MARGIN - 12.0
        );
        let _ = writeln!(out, r#"<line x1="{x0}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#, y(0.0), x0 + PANEL_W);
        let _ = writeln!(
            out,
            r#"<line x1="{x0}" y1="{0}" x2="{1}" y2="{0}" stroke="gray" stroke-dasharray="4"/><text x="{2}" y="{0}" text-anchor="end" dy="4">1.0</text>"#,
            y(1.0),
            x0 + PANEL_W,
            x0 - 4.0
        );
        let group_w = PANEL_W / counts.len().max(1) as f64;
        let bar_w = group_w * 0.8 / targets.len().max(1) as f64;
        for (c, count) in counts.iter().enumerate() {
            let gx = x0 + c as f64 * group_w + group_w * 0.1;
            let label = format!("{} svc", count["services"]);
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + group_w * 0.4,
                y(0.0) + 16.0
            );
            for (t, target) in targets.iter().enumerate() {
                let Some(r) = ratio(count, target, key) else { continue };
                let bx = gx + t as f64 * bar_w;
                let _ = writeln!(
                    out,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{target}: {r:.2}x</title></rect>"#,
                    y(r),
                    bar_w * 0.9,
                    y(0.0) - y(r),
                    COLORS[t % COLORS.len()]
                );
            }
        }
    }
    for (t, target) in targets.iter().enumerate() {
        let ly = PANEL_H + 2.0 * MARGIN + 20.0 * t as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{MARGIN}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{target}</text>"#,
            COLORS[t % COLORS.len()],
            MARGIN + 18.0,
            ly + 11.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_bar_per_target_and_count_scaled_to_the_largest_ratio() {
        let proxy = json!({ "byServices": [
            { "services": 1, "results": [
                { "target": "direct", "rps": { "ratio": 1.0 } },
                { "target": "agent-ebpf", "rps": { "ratio": 2.0 } } ] },
            { "services": 1000, "results": [
                { "target": "direct", "rps": { "ratio": 1.0 } },
                { "target": "haproxy", "skipped": "at 1 service only" } ] } ] });
        let svg = svg(&[("rps", "req/s")], &proxy);
        assert_eq!(svg.matches("<rect x=").count(), 3 + 3, "three bars and three legend swatches");
        assert!(svg.contains("agent-ebpf: 2.00x"));
        // The scale tops out at the largest ratio (2.0), so the 2.0 bar spans the whole panel.
        assert!(svg.contains(&format!(r#"y="{MARGIN:.1}""#)), "{svg}");
    }
}
