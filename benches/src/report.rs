//! A self-contained SVG report: latency CDFs (time to first token, inter-token gap) and token
//! throughput over time. Hand-drawn (no plotting dependency), viewable in any browser.

use std::fmt::Write;

/// One line of a chart.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// The empirical CDF of `values` as points (value, fraction ≤ value).
pub fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len().max(1) as f64;
    let step = (values.len() / 400).max(1);
    values
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == values.len())
        .map(|(i, v)| (*v, (i + 1) as f64 / n))
        .collect()
}

/// Bucket event times (seconds) into per-bucket rates (events/s).
pub fn rate_over_time(times: &[f64], bucket_s: f64) -> Vec<(f64, f64)> {
    let end = times.iter().copied().fold(0.0, f64::max);
    let buckets = (end / bucket_s).ceil() as usize + 1;
    let mut counts = vec![0u64; buckets];
    for t in times {
        counts[(t / bucket_s) as usize] += 1;
    }
    counts.iter().enumerate().map(|(i, c)| (i as f64 * bucket_s, *c as f64 / bucket_s)).collect()
}

/// Where a chart goes on the page.
struct Area {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    log_x: bool,
}

fn chart(svg: &mut String, area: Area, c: Chart<'_>, series: &[Series<'_>]) {
    let Area { x0, y0, w, h } = area;
    let Chart { title, x_label, log_x } = c;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymax) = (f64::INFINITY, 0f64, 0f64);
    for (x, y) in all {
        xmin = xmin.min(*x);
        xmax = xmax.max(*x);
        ymax = ymax.max(*y);
    }
    if !xmin.is_finite() {
        return;
    }
    let tx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let (lo, hi) = (tx(if log_x { xmin.max(1e-3) } else { 0.0 }), tx(xmax).max(tx(xmin) + 1e-9));
    let sx = |x: f64| x0 + (tx(x) - lo) / (hi - lo) * w;
    let sy = |y: f64| y0 + h - y / ymax.max(1e-9) * h;
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="14" font-weight="bold">{title}</text>"##,
        x0,
        y0 - 10.0
    );
    let _ = write!(svg, r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##);
    for i in 0..=4 {
        let fx = lo + (hi - lo) * f64::from(i) / 4.0;
        let value = if log_x { 10f64.powf(fx) } else { fx };
        let x = x0 + w * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{}" font-size="11" text-anchor="middle">{value:.3}</text>"##,
            y0 + h + 14.0
        );
        let y = y0 + h - h * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{y}" font-size="11" text-anchor="end">{:.2}</text>"##,
            x0 - 4.0,
            ymax * f64::from(i) / 4.0
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">{x_label}</text>"##,
        x0 + w / 2.0,
        y0 + h + 30.0
    );
    for (k, s) in series.iter().enumerate() {
        let path: Vec<String> =
            s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"##,
            s.color,
            path.join(" ")
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" fill="{}">{}</text>"##,
            x0 + 8.0,
            y0 + 16.0 + 15.0 * k as f64,
            s.color,
            s.label
        );
    }
}

/// The whole report: two CDFs and a throughput chart.
pub fn render(title: &str, ttft: &[Series<'_>], gaps: &[Series<'_>], throughput: &[Series<'_>]) -> String {
    let mut svg = String::from(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="980" height="720" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"##,
    );
    let _ = write!(svg, r##"<text x="20" y="28" font-size="18" font-weight="bold">{title}</text>"##);
    chart(
        &mut svg,
        Area { x0: 70.0, y0: 70.0, w: 380.0, h: 250.0 },
        Chart { title: "Time to first token (CDF)", x_label: "milliseconds (log)", log_x: true },
        ttft,
    );
    chart(
        &mut svg,
        Area { x0: 560.0, y0: 70.0, w: 380.0, h: 250.0 },
        Chart { title: "Inter-token gap (CDF)", x_label: "milliseconds (log)", log_x: true },
        gaps,
    );
    chart(
        &mut svg,
        Area { x0: 70.0, y0: 420.0, w: 870.0, h: 230.0 },
        Chart { title: "Token events per second over time", x_label: "seconds since start", log_x: false },
        throughput,
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_and_rates() {
        let c = cdf(vec![3.0, 1.0, 2.0]);
        assert_eq!(c, vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
        let r = rate_over_time(&[0.05, 0.15, 0.16], 0.1);
        assert_eq!(r[0].1 as u32, 10);
        assert_eq!(r[1].1 as u32, 20);
        let svg = render("t", &[Series { label: "a", color: "#000", points: c }], &[], &[]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    }
}
