//! `phasekit report RUN_DIR`: one self-contained HTML page about a training run (or a folder of
//! runs, such as the quickstart's), for a person to read or send.
//!
//! The page has, per run: the recipe (its text and digest) and the phases (σ range, steps,
//! timesteps, expert file and its sha256, checked against the run's own record), the time and
//! peak memory of each phase, the loss curves and the samples; then the metrics table and the
//! assembled checkpoint's digest and routing, when there is one. Images are PNGs inlined as
//! `data:` URIs; the page has no script and loads nothing, so it opens offline, in a mail, or
//! from an archive.
//!
//! It reads only what runs write (`docs/recipes.md`, "The run folder"): `manifest.json`
//! (`phasekit.run/1`, required), `recipe.toml`, `log.jsonl`, `toy.json` or `transformer.json`,
//! `summary.json`, `plots/*.png`, the expert files; and in a folder of runs `metrics.json` and
//! `metrics.png` (the quickstart writes them). Fields are read loosely (a missing one is shown as
//! missing), so reports of older runs still render. The checkpoint is the one given, or a
//! `*.safetensors` routed checkpoint beside the run (in the run folder or its parent) whose
//! recorded recipe digest is the run's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, IoContext, Kind, Result};
use crate::moe::MoeCheckpoint;

pub mod cli;

/// What [`write`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSummary {
    pub out: PathBuf,
    /// Runs on the page.
    pub runs: usize,
    /// Inlined images.
    pub images: usize,
    /// The checkpoint shown, if any.
    pub checkpoint: Option<PathBuf>,
    /// Size of the page in bytes.
    pub bytes: usize,
}

/// Write the report of `dir` (a run folder or a folder of runs) to `out`; `checkpoint` names the
/// assembled checkpoint to show (default: found beside the run).
pub fn write(dir: &Path, out: &Path, checkpoint: Option<&Path>, force: bool) -> Result<ReportSummary> {
    crate::atomic::check_target(out, force)?;
    let page = build(dir, checkpoint)?;
    crate::atomic::write_file(out, page.html.as_bytes())?;
    Ok(ReportSummary { out: out.to_path_buf(), runs: page.runs, images: page.images, checkpoint: page.checkpoint, bytes: page.html.len() })
}

/// A rendered page.
pub struct Page {
    pub html: String,
    pub runs: usize,
    pub images: usize,
    pub checkpoint: Option<PathBuf>,
}

/// One run folder's files, read.
struct Run {
    dir: PathBuf,
    manifest: Value,
    /// `toy.json` or `transformer.json`.
    info: Value,
    recipe: Option<String>,
    log: Vec<Value>,
    summary: Option<Value>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_file(path)?;
    serde_json::from_str(&text).map_err(|e| Error::malformed(path, format!("invalid JSON: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl Run {
    fn open(dir: &Path) -> Result<Run> {
        let mp = dir.join("manifest.json");
        let manifest = read_json(&mp)?;
        if manifest.get("format").and_then(Value::as_str) != Some("phasekit.run/1") {
            return Err(Error::at(Kind::Unsupported, &mp, "is not a phasekit.run/1 manifest (format field)"));
        }
        let info = match (read_json_opt(&dir.join("toy.json"))?, read_json_opt(&dir.join("transformer.json"))?) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => Value::Null,
        };
        let rp = dir.join("recipe.toml");
        let recipe = if rp.is_file() { Some(std::fs::read_to_string(&rp).with_file(&rp)?) } else { None };
        let lp = dir.join("log.jsonl");
        let log = if lp.is_file() {
            let text = std::fs::read_to_string(&lp).with_file(&lp)?;
            let mut v = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                v.push(serde_json::from_str(line).map_err(|e| Error::malformed(&lp, format!("line {}: {e}", i + 1)))?);
            }
            v
        } else {
            Vec::new()
        };
        let summary = read_json_opt(&dir.join("summary.json"))?;
        Ok(Run { dir: dir.to_path_buf(), manifest, info, recipe, log, summary })
    }

    fn title(&self) -> String {
        let name = self.manifest.get("title").and_then(Value::as_str).or_else(|| self.info.get("name").and_then(Value::as_str));
        name.map(str::to_string).unwrap_or_else(|| self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
    }

    fn experts(&self) -> &[Value] {
        self.manifest.get("experts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Per phase: (seconds, peak resident bytes and its scope, device pool peak bytes).
    fn phase_costs(&self) -> Vec<PhaseCost> {
        let mut out: Vec<PhaseCost> = Vec::new();
        let mut prev = 0.0;
        for l in &self.log {
            let (Some(p), Some(s)) = (l.get("phase").and_then(Value::as_u64), l.get("seconds").and_then(Value::as_f64)) else { continue };
            let p = p as usize;
            if out.len() <= p {
                out.resize_with(p + 1, PhaseCost::default);
            }
            // `seconds` counts from the process start: a resumed run starts again from 0.
            out[p].seconds += if s >= prev { s - prev } else { s };
            prev = s;
            out[p].updates = l.get("step").and_then(Value::as_u64).unwrap_or(out[p].updates);
            if let Some(m) = l.get("memory") {
                out[p].rss = m.get("peak_rss_bytes").and_then(Value::as_u64);
                out[p].rss_scope = m.get("peak_rss_scope").and_then(Value::as_str).map(str::to_string);
                out[p].device = m.get("device_peak_bytes").and_then(Value::as_u64);
            }
        }
        out
    }
}

#[derive(Debug, Default, Clone)]
struct PhaseCost {
    seconds: f64,
    updates: u64,
    rss: Option<u64>,
    rss_scope: Option<String>,
    device: Option<u64>,
}

/// The runs under `dir`: `dir` itself, or its sub-folders that are runs (sorted by name).
fn runs_in(dir: &Path) -> Result<Vec<Run>> {
    if !dir.is_dir() {
        return Err(if dir.exists() {
            Error::at(Kind::Usage, dir, "is not a folder (give a run folder, the --out of `phasekit train` or `quickstart`)")
        } else {
            Error::io(dir, std::io::Error::from(std::io::ErrorKind::NotFound))
        });
    }
    if dir.join("manifest.json").is_file() {
        return Ok(vec![Run::open(dir)?]);
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir).with_file(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    subs.sort();
    let runs: Vec<Run> = subs.iter().filter(|p| p.join("manifest.json").is_file()).map(|p| Run::open(p)).collect::<Result<_>>()?;
    if runs.is_empty() {
        return Err(Error::at(Kind::Usage, dir, "is not a run folder (no manifest.json) and holds none"));
    }
    Ok(runs)
}

/// A routed checkpoint beside the runs whose recipe digest is one of theirs.
fn find_checkpoint(dir: &Path, runs: &[Run]) -> Option<PathBuf> {
    let digests: Vec<&str> = runs.iter().filter_map(|r| r.manifest.get("recipe_digest").and_then(Value::as_str)).collect();
    let mut places = vec![dir.to_path_buf()];
    if runs.len() == 1 {
        if let Some(p) = dir.parent() {
            places.push(p.to_path_buf());
        }
    }
    for place in places {
        let Ok(rd) = std::fs::read_dir(&place) else { continue };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            if let Ok(m) = MoeCheckpoint::open(&f) {
                if m.meta().provenance.recipe_digest.as_deref().is_some_and(|d| digests.contains(&d)) {
                    return Some(f);
                }
            }
        }
    }
    None
}

/// The page for `dir`.
pub fn build(dir: &Path, checkpoint: Option<&Path>) -> Result<Page> {
    let runs = runs_in(dir)?;
    let ck_path = match checkpoint {
        Some(p) => Some(p.to_path_buf()),
        None => find_checkpoint(dir, &runs),
    };
    let ck = ck_path.as_deref().map(MoeCheckpoint::open).transpose()?;
    let mut h = Html::default();
    let title = if runs.len() == 1 { format!("phasekit run: {}", runs[0].title()) } else { format!("phasekit runs in {}", dir.display()) };
    h.head(&title);
    h.raw(&format!("<h1>{}</h1>\n", esc(&title)));
    h.raw(&format!(
        "<p class=\"meta\">Folder <code>{}</code> · written by phasekit {}</p>\n",
        esc(&dir.display().to_string()),
        env!("CARGO_PKG_VERSION")
    ));
    // Contents.
    h.raw("<nav><b>Contents</b><ul>");
    let folder = runs.len() > 1;
    if folder {
        h.raw("<li><a href=\"#comparison\">Comparison</a></li>");
    }
    for (i, r) in runs.iter().enumerate() {
        h.raw(&format!("<li><a href=\"#run-{i}\">{}</a></li>", esc(&r.title())));
    }
    if ck.is_some() {
        h.raw("<li><a href=\"#checkpoint\">Assembled checkpoint</a></li>");
    }
    h.raw("</ul></nav>\n");
    if folder {
        comparison(&mut h, dir)?;
    }
    for (i, r) in runs.iter().enumerate() {
        run_section(&mut h, i, r)?;
    }
    if let (Some(m), Some(p)) = (&ck, &ck_path) {
        checkpoint_section(&mut h, m, p);
    }
    h.raw("</body>\n</html>\n");
    Ok(Page { html: h.out, runs: runs.len(), images: h.images, checkpoint: ck_path })
}

fn comparison(h: &mut Html, dir: &Path) -> Result<()> {
    h.raw("<section id=\"comparison\"><h2>Comparison</h2>\n");
    let png = dir.join("metrics.png");
    if png.is_file() {
        h.image(&png, "Bar chart of each sampler's metrics against the exact mixture")?;
    }
    match read_json_opt(&dir.join("metrics.json"))? {
        Some(v) => {
            let rows: Vec<(String, Value)> = v
                .get("rows")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter().map(|r| (r.get("sampler").and_then(Value::as_str).unwrap_or("?").to_string(), r["metrics"].clone())).collect()
                })
                .unwrap_or_default();
            metrics_table(h, &rows);
        }
        None => h.raw("<p class=\"missing\">No metrics.json in this folder.</p>\n"),
    }
    h.raw("</section>\n");
    Ok(())
}

/// The metrics table (one row per sampler; the fields of `phasekit::train::metrics::Metrics`).
fn metrics_table(h: &mut Html, rows: &[(String, Value)]) {
    h.raw("<table class=\"num\"><thead><tr><th>sampler</th><th>energy distance</th><th>MMD²</th><th>modes covered</th><th>mode-weight error</th><th>outliers</th><th>spread</th><th>diversity</th></tr></thead><tbody>\n");
    let f = |v: &Value, k: &str, d: usize| v.get(k).and_then(Value::as_f64).map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into());
    for (name, m) in rows {
        let modes = match (m.get("modes_covered").and_then(Value::as_u64), m.get("modes").and_then(Value::as_u64)) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            _ => "–".into(),
        };
        h.raw(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{modes}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(name),
            f(m, "energy", 4),
            f(m, "mmd", 4),
            f(m, "mode_weight_error", 3),
            f(m, "outliers", 3),
            f(m, "spread", 2),
            f(m, "diversity", 2)
        ));
    }
    h.raw("</tbody></table>\n<p class=\"note\">Against the exact mixture: energy distance and MMD² (0 for an exact sampler, up to sampling noise), modes holding at least a tenth of their expected share, total-variation error of the mode weights, fraction of samples far from every mode, within-mode spread and overall diversity relative to exact samples (1 is exact).</p>\n");
}

fn gib(b: u64) -> String {
    if b < 1 << 30 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

fn run_section(h: &mut Html, i: usize, r: &Run) -> Result<()> {
    h.raw(&format!("<section id=\"run-{i}\"><h2>{}</h2>\n", esc(&r.title())));
    // What the run is.
    let method = r.info.get("method").and_then(Value::as_str);
    let model = r.info.get("model").and_then(Value::as_str);
    let mut facts: Vec<(String, String)> = Vec::new();
    facts.push(("folder".into(), format!("<code>{}</code>", esc(&r.dir.display().to_string()))));
    if let Some(m) = model {
        facts.push(("model".into(), esc(m)));
    }
    if let Some(m) = method {
        facts.push(("method".into(), esc(m)));
    }
    let num = |k: &str| r.manifest.get(k).map(|v| esc(v.to_string().trim_matches('"')));
    for (k, label) in [("steps", "sampling steps"), ("shift", "shift"), ("solver", "solver"), ("guidance", "guidance (CFG)")] {
        if let Some(v) = num(k) {
            facts.push((label.into(), v));
        }
    }
    if let Some(d) = r.manifest.get("recipe_digest").and_then(Value::as_str) {
        facts.push(("recipe digest".into(), format!("<code>{}</code>", esc(d))));
    }
    if let Some(d) = r.manifest.get("teacher_digests").and_then(Value::as_array) {
        let list: Vec<String> = d.iter().filter_map(Value::as_str).map(|s| format!("<code>{}</code>", esc(s))).collect();
        facts.push(("teacher digests".into(), list.join("<br>")));
    }
    h.raw("<table class=\"facts\">");
    for (k, v) in &facts {
        h.raw(&format!("<tr><th>{}</th><td>{v}</td></tr>", esc(k)));
    }
    h.raw("</table>\n");

    // Phases: routing, files, time and memory.
    let costs = r.phase_costs();
    let recorded: Vec<Option<String>> = {
        let list = r.info.get("experts").and_then(Value::as_array);
        (0..r.experts().len())
            .map(|k| list.and_then(|l| l.get(k)).and_then(|e| e.get("sha256")).and_then(Value::as_str).map(str::to_string))
            .collect()
    };
    let steps_of = |k: usize| r.info.get("experts").and_then(|l| l.get(k)).and_then(|e| e.get("steps")).and_then(Value::as_array).cloned();
    h.raw("<h3>Phases</h3>\n<table class=\"num\"><thead><tr><th>phase</th><th>expert</th><th>σ range</th><th>steps</th><th>timesteps</th><th>expert file</th><th>sha256</th><th>time</th><th>peak memory</th></tr></thead><tbody>\n");
    for (k, e) in r.experts().iter().enumerate() {
        let lo = e.get("sigma_lo").and_then(Value::as_f64);
        let hi = e.get("sigma_hi").and_then(Value::as_f64);
        let range = match (lo, hi) {
            (Some(lo), Some(hi)) => range_text(lo, hi),
            _ => "–".into(),
        };
        let ts = e
            .get("timesteps")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).map(num_text).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "–".into());
        let steps = steps_of(k)
            .and_then(|s| {
                let (a, b) = (s.first()?.as_u64()? + 1, s.get(1)?.as_u64()?);
                Some(if a >= b { b.to_string() } else { format!("{a}–{b}") })
            })
            .unwrap_or_else(|| "–".into());
        let rel = e.get("path").and_then(Value::as_str).unwrap_or("");
        let kind = e.get("kind").and_then(Value::as_str).unwrap_or("?");
        // Unnamed experts get the assembler's default names (e0, e1, ...).
        let name = format!("{} · {kind}", e.get("name").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("e{k}")));
        let (file, hash) = if rel.is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let p = r.dir.join(rel);
            match crate::hash::sha256_file(&p, &|_| {}) {
                Ok(d) => {
                    let check = match &recorded[k] {
                        Some(want) if *want == d => {
                            " <span class=\"ok\" title=\"equals the run's record\">✓ as recorded</span>".to_string()
                        }
                        Some(_) => " <span class=\"bad\">✗ differs from the run's record</span>".to_string(),
                        None => String::new(),
                    };
                    (format!("<code>{}</code>", esc(rel)), format!("<code class=\"hash\">{}</code>{check}", esc(&d)))
                }
                Err(err) => (format!("<code>{}</code>", esc(rel)), format!("<span class=\"bad\">{}</span>", esc(err.message()))),
            }
        };
        let c = costs.get(k);
        let time =
            c.filter(|c| c.seconds > 0.0).map(|c| format!("{:.1} s ({} updates)", c.seconds, c.updates)).unwrap_or_else(|| "–".into());
        let mem = match c {
            Some(PhaseCost { rss: Some(b), rss_scope, device, .. }) => {
                let mut s = gib(*b);
                if rss_scope.as_deref() == Some("process") {
                    s.push_str(" <span class=\"note\">(process peak)</span>");
                }
                if let Some(d) = device {
                    s.push_str(&format!("<br>device {}", gib(*d)));
                }
                s
            }
            _ => "–".into(),
        };
        h.raw(&format!(
            "<tr><td>{}</td><td>{}</td><td>{range}</td><td>{steps}</td><td>{ts}</td><td>{file}</td><td>{hash}</td><td>{time}</td><td>{mem}</td></tr>\n",
            k + 1,
            esc(&name)
        ));
    }
    h.raw("</tbody></table>\n<p class=\"note\">Time: wall-clock seconds of the phase's generator updates (with their fake-score updates) from <code>log.jsonl</code>. Peak memory: the process's peak resident set during the phase (Linux <code>VmHWM</code>, reset at each phase start; \"process peak\" where the reset was not permitted), and the GPU pool's peak on CUDA.</p>\n");

    // Plots.
    h.raw("<h3>Losses</h3>\n");
    let losses = r.dir.join("plots/losses.png");
    if losses.is_file() {
        h.image(&losses, "Generator and fake-score loss per phase against the generator update")?;
    } else if !r.log.is_empty() {
        h.png(&loss_chart(r)?, "Generator and fake-score loss per phase against the generator update");
    } else {
        h.raw("<p class=\"missing\">No log.jsonl: the run logged no updates.</p>\n");
    }
    h.raw("<h3>Samples</h3>\n");
    let samples = r.dir.join("plots/samples.png");
    if samples.is_file() {
        h.image(&samples, "Samples after each sampling step, σ in each panel's title")?;
    } else {
        h.raw("<p class=\"missing\">No sample plot: transformer runs sample latents (<code>phasekit sample --run</code>); toy runs plot theirs when trained with <code>--eval-samples</code> above 0.</p>\n");
    }
    if let Some(s) = &r.summary {
        h.raw("<h3>Metrics</h3>\n");
        metrics_table(h, &[(r.title(), s.clone())]);
    }
    if let Some(text) = &r.recipe {
        h.raw(&format!("<h3>Recipe</h3>\n<details open><summary><code>recipe.toml</code></summary><pre>{}</pre></details>\n", esc(text)));
    }
    h.raw("</section>\n");
    Ok(())
}

/// Loss curves drawn from the log, for runs without `plots/losses.png`.
fn loss_chart(r: &Run) -> Result<Vec<u8>> {
    use crate::plot::{LineChart, LinePanel, Series};
    let phases = r.log.iter().filter_map(|l| l.get("phase").and_then(Value::as_u64)).max().map(|p| p as usize + 1).unwrap_or(0);
    let of = |p: usize, key: &str| -> Vec<(f64, f64)> {
        r.log
            .iter()
            .filter(|l| l.get("phase").and_then(Value::as_u64) == Some(p as u64))
            .filter_map(|l| Some((l.get("global_step")?.as_f64()?, l.get(key)?.as_f64()?)))
            .collect()
    };
    let panels = (0..phases)
        .map(|p| LinePanel {
            title: format!("phase {} of {phases}", p + 1),
            series: vec![
                Series { label: "generator".into(), points: of(p, "gen_loss") },
                Series { label: "fake score".into(), points: of(p, "fake_loss") },
            ],
        })
        .collect();
    let chart = LineChart {
        title: format!("{}: losses per phase", r.title()),
        panels,
        x_label: "generator update".into(),
        y_label: "loss (log scale)".into(),
        log_y: true,
        columns: 2,
    };
    crate::plot::lines(&chart)?.png()
}

fn checkpoint_section(h: &mut Html, m: &MoeCheckpoint, path: &Path) {
    let meta = m.meta();
    let r = m.routing();
    h.raw("<section id=\"checkpoint\"><h2>Assembled checkpoint</h2>\n<table class=\"facts\">");
    let mut row = |k: &str, v: String| h.raw(&format!("<tr><th>{}</th><td>{v}</td></tr>", esc(k)));
    row("file", format!("<code>{}</code>", esc(&path.display().to_string())));
    row("format", esc(meta.tag()));
    row("metadata digest", format!("<code class=\"hash\">{}</code>", esc(&meta.digest)));
    let sidecar = crate::hash::sidecar_path(path);
    if let Ok(lines) = crate::hash::read_sidecar(&sidecar) {
        if let Some((d, _)) = lines.first() {
            row("file sha256 (sidecar)", format!("<code class=\"hash\">{}</code>", esc(d)));
        }
    }
    row("tensors", format!("{} ({} in the hash table)", m.checkpoint().tensors.len(), meta.tensors.len()));
    row("sampler", esc(&format!("{} steps, shift {}, {}, CFG {}", r.steps, num_text(r.shift), r.solver, num_text(r.guidance))));
    row("tool", esc(&meta.provenance.tool));
    h.raw("</table>\n<table class=\"num\"><thead><tr><th>expert</th><th>kind</th><th>σ range</th><th>timesteps</th></tr></thead><tbody>\n");
    for e in &r.experts {
        let ts: Vec<String> = e.timesteps.iter().map(|t| num_text(*t)).collect();
        h.raw(&format!(
            "<tr><td>{}</td><td>{}</td><td>[{}, {}{}</td><td>{}</td></tr>\n",
            esc(&e.name),
            e.kind.as_str(),
            num_text(e.sigma_lo),
            num_text(e.sigma_hi),
            if e.sigma_hi >= 1.0 { "]" } else { ")" },
            ts.join(", ")
        ));
    }
    h.raw("</tbody></table>\n<p class=\"note\">The digest covers the routing, the model config, the provenance and the sha256 of every tensor (docs/moe-format.md §5). <code>phasekit verify FILE</code> recomputes them all.</p>\n</section>\n");
}

/// A routed σ range `[lo, hi)` as a person reads it. The expert whose range ends at 1 also
/// serves σ = 1 (closed there); a bound that is the float right above a round number σ (how
/// phase intervals `(σ_end, σ_start]` are stored) is shown as that number, open or closed.
fn range_text(lo: f64, hi: f64) -> String {
    // `x` is the float right above a number with a shorter decimal form: that number.
    let just_above = |x: f64| -> Option<f64> {
        let below = f64::from_bits(x.to_bits().checked_sub(1)?);
        (x > 0.0 && format!("{below}").len() < format!("{x}").len()).then_some(below)
    };
    let (open, lo_v) = match just_above(lo) {
        Some(b) => ("(", b),
        None => ("[", lo),
    };
    let (close, hi_v) = match (hi >= 1.0, just_above(hi)) {
        (true, _) => ("]", hi),
        (false, Some(b)) => ("]", b),
        (false, None) => (")", hi),
    };
    format!("{open}{}, {}{close}", num_text(lo_v), num_text(hi_v))
}

/// A number as short text (`0.875`, `1000`, `833.333`).
fn num_text(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// HTML text escaping (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1560px;margin:24px auto;padding:0 20px;color:#222;line-height:1.45}\
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}h3{margin-top:24px}\
.meta,.note{color:#666;font-size:.9em}.missing{color:#a60}nav ul{margin:4px 0 0 0}\
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}\
thead th{background:#f4f4f4}table.facts th{background:#f8f8f8;font-weight:600}table.num td{font-variant-numeric:tabular-nums}\
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}code.hash{word-break:break-all}\
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:10px;overflow:auto;font-size:.85em}\
img{max-width:100%;height:auto;border:1px solid #eee;display:block;margin:8px 0}.ok{color:#080}.bad{color:#b00;font-weight:600}";

/// The page being written.
#[derive(Default)]
struct Html {
    out: String,
    images: usize,
}

impl Html {
    fn head(&mut self, title: &str) {
        let _ = write!(
            self.out,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
            esc(title)
        );
    }
    fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }
    /// A PNG inlined as a data URI, with its pixel size (so the page does not jump as it loads).
    fn png(&mut self, bytes: &[u8], alt: &str) {
        let (w, h) = png_size(bytes).unwrap_or((0, 0));
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let size = if w > 0 { format!(" width=\"{w}\" height=\"{h}\"") } else { String::new() };
        let _ = writeln!(self.out, "<img src=\"data:image/png;base64,{b64}\"{size} alt=\"{}\">", esc(alt));
        self.images += 1;
    }
    fn image(&mut self, path: &Path, alt: &str) -> Result<()> {
        let bytes = std::fs::read(path).with_file(path)?;
        if png_size(&bytes).is_none() {
            return Err(Error::malformed(path, "is not a PNG file"));
        }
        self.png(&bytes, alt);
        Ok(())
    }
}

/// Width and height from a PNG's IHDR.
fn png_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() < 24 || &b[..8] != b"\x89PNG\r\n\x1a\n" || &b[12..16] != b"IHDR" {
        return None;
    }
    Some((u32::from_be_bytes(b[16..20].try_into().ok()?), u32::from_be_bytes(b[20..24].try_into().ok()?)))
}

/// The quickstart's hook: `metrics.json` (the comparison rows) in `out`, and the report of the
/// whole folder as `out/report.html`; returns the report's path.
pub fn quickstart(out: &Path, rows: &[(String, impl Serialize)]) -> Result<PathBuf> {
    let v: Vec<Value> = rows.iter().map(|(n, m)| serde_json::json!({ "sampler": n, "metrics": m })).collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({ "format": "phasekit-metrics/1", "rows": v }))
        .map_err(|e| Error::internal(e.to_string()))?;
    crate::atomic::write_file(&out.join("metrics.json"), format!("{text}\n").as_bytes())?;
    let path = out.join("report.html");
    write(out, &path, None, true)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn png_size_reads_ihdr() {
        let img = crate::plot::Image { width: 7, height: 3, rgb: vec![255; 63] };
        assert_eq!(png_size(&img.png().unwrap()), Some((7, 3)));
        assert_eq!(png_size(b"GIF89a"), None);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(num_text(0.875), "0.875");
        assert_eq!(num_text(1000.0), "1000");
        assert_eq!(num_text(833.3333333), "833.333");
        assert_eq!(num_text(0.0), "0");
    }
}
