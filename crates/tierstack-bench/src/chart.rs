//! Renders the results as an SVG bar chart of ratios (lower is better; 1.0 is parity).

use std::fmt::Write as _;

use crate::harness::Record;

const WIDTH: f64 = 1040.0;
const LABEL: f64 = 470.0;
const ROW: f64 = 24.0;
const TOP: f64 = 48.0;

/// One bar per system that is not its scenario's own baseline.
pub(crate) fn svg(records: &[Record]) -> String {
    let bars: Vec<&Record> = records.iter().filter(|r| r.system != r.baseline).collect();
    let max_ratio = bars
        .iter()
        .map(|r| r.ratio)
        .fold(1.5_f64, f64::max)
        .min(4.0);
    let scale = (WIDTH - LABEL - 60.0) / max_ratio;
    #[expect(clippy::cast_precision_loss, reason = "a few dozen rows")]
    let height = TOP + ROW * bars.len() as f64 + 40.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">tierstack vs baseline: time per operation ratio (lower is better)</text>"#
    );
    for (i, record) in bars.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a few dozen rows")]
        let y = TOP + ROW * i as f64;
        let width = (record.ratio.min(max_ratio) * scale).max(1.0);
        let color = if record.ratio <= 1.0 {
            "#2e7d32"
        } else {
            "#c77c02"
        };
        let label = format!(
            "{} · {} vs {}",
            record.scenario, record.system, record.baseline
        );
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}">{}</text>"#,
            y + 15.0,
            escape(&label)
        );
        let _ = writeln!(
            out,
            r#"<rect x="{LABEL}" y="{}" width="{width:.1}" height="{}" fill="{color}"/>"#,
            y + 3.0,
            ROW - 6.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}">{:.3}</text>"#,
            LABEL + width + 6.0,
            y + 15.0,
            record.ratio
        );
    }
    let parity = LABEL + scale;
    let bottom = height - 30.0;
    let _ = writeln!(
        out,
        r##"<line x1="{parity:.1}" y1="{TOP}" x2="{parity:.1}" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}">1.0 = parity</text>"#,
        parity - 30.0,
        bottom + 16.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
