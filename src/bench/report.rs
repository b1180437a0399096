//! Bench results: one [`Line`] per measurement, printed as a table or as JSON. A leaf module, so
//! that benches registered from elsewhere (`crate::train::speed`) can use it.

use serde::Serialize;

use crate::cli::printer::Printer;

/// One measurement: a value, the baseline it is compared with in the same run, and the ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub baseline: String,
    pub baseline_value: Option<f64>,
    pub ratio: Option<f64>,
    pub target: String,
    pub pass: Option<bool>,
    pub note: String,
}

/// Print bench lines: the list with `--json`, else the table.
pub fn print(lines: &[Line], p: &Printer) {
    p.value(&lines, |o| write!(o, "{}", render(lines)));
}

/// A text table of bench lines.
pub fn render(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        // Ratios of ratios (compression) need three decimals to show which side wins.
        let d = if l.unit == "×" { 3 } else { 2 };
        let base = l.baseline_value.map_or("n/a".into(), |b| format!("{b:.d$}"));
        let ratio = l.ratio.map_or("".into(), |r| format!("  ratio {r:.d$}×"));
        let pass = match l.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "----",
        };
        s.push_str(&format!(
            "{pass} {:<58} {:>9.d$} {:<5} vs {} {}{ratio}  (target {}) {}\n",
            l.name, l.value, l.unit, l.baseline, base, l.target, l.note
        ));
    }
    s
}
