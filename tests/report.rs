//! `phasekit report`: the page of a short toy run (and of a folder of runs, as the quickstart
//! writes it) holds what the run folder says — each expert file's sha256, the σ ranges, the time
//! and peak memory per phase from log.jsonl, the checkpoint's digest — with every image inlined;
//! bad inputs fail with their exit code and write nothing. Then headless Chromium (Debian's
//! `chromium`) opens the page: a screenshot, no console errors, every image decoded. Without
//! Chromium that part prints "skipped:" (CI installs it: .ci/run).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, run_ok, s};
use phasekit::moe::MoeCheckpoint;

/// The quickstart's toy recipe cut to a few seconds: small MLP, few updates, 2 phases.
fn tiny_recipe(dir: &Path, name: &str, phases: &str) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/toy-phased-4step-4phase.toml")).unwrap();
    let text = text
        .replace("name = \"toy-phased-4step-4phase\"", &format!("name = \"{name}\""))
        .replace("width = 64", "width = 16")
        .replace("depth = 3", "depth = 2")
        .replace("steps = 1500", "steps = 40")
        .replace("batch = 256", "batch = 32")
        .replace("phases = [1, 2, 3, 4]", &format!("phases = {phases}"))
        .replace("updates_per_phase = 500", "updates_per_phase = 6")
        .replace("ttur = 5", "ttur = 1")
        .replace("checkpoint_every = 100", "checkpoint_every = 3")
        .replace("log_every = 10", "log_every = 2");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn train(dir: &Path, name: &str, phases: &str) -> PathBuf {
    let recipe = tiny_recipe(dir, name, phases);
    let out = dir.join(name);
    run_ok(&["train", "--recipe", &s(&recipe), "--out", &s(&out), "--eval-samples", "200", "--quiet"]);
    out
}

fn sha256_file(p: &Path) -> String {
    phasekit::hash::sha256_hex(&std::fs::read(p).unwrap())
}

/// Every `data:image/png;base64,` payload of a page, decoded.
fn images(html: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    html.split("src=\"data:image/png;base64,")
        .skip(1)
        .map(|rest| base64::engine::general_purpose::STANDARD.decode(rest.split('"').next().unwrap()).unwrap())
        .collect()
}

#[test]
fn report_of_a_run_holds_what_the_run_folder_says() {
    let d = tempfile::tempdir().unwrap();
    let runs = d.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let out = train(&runs, "tiny-phased", "[2, 4]");
    let moe = runs.join("tiny-phased.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    let page = d.path().join("report.html");
    let o = run_ok(&["report", &s(&out), "-o", &s(&page), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["report"]["runs"], 1);
    assert_eq!(v["report"]["images"], 2, "losses and samples");
    assert_eq!(v["report"]["checkpoint"], s(&moe), "found beside the run by its recipe digest");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    // No script, nothing loaded from anywhere: every image is inline and is a real PNG.
    assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"));
    let imgs = images(&html);
    assert_eq!(imgs.len(), 2);
    for (png, file) in imgs.iter().zip(["plots/losses.png", "plots/samples.png"]) {
        assert_eq!(png, &std::fs::read(out.join(file)).unwrap(), "{file} inlined byte for byte");
    }
    // Each expert's file and sha256 (checked against the run's record), its σ range and timesteps.
    for k in 0..2 {
        let f = out.join(format!("experts/expert-{k}.safetensors"));
        assert!(html.contains(&format!("experts/expert-{k}.safetensors")));
        assert!(html.contains(&sha256_file(&f)), "expert {k}'s sha256");
    }
    assert_eq!(html.matches("✓ as recorded").count(), 2);
    // Phase 1 owns (0.5, 1], phase 2 [0, 0.5] (σ = 0.5 is phase 2's first step).
    assert!(html.contains("(0.5, 1]") && html.contains("[0, 0.5]"), "σ ranges as phase intervals");
    assert!(html.contains("1000, 750") && html.contains("500, 250"), "timesteps");
    // Time per phase: the log's seconds, phase by phase.
    let log: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let end = |p: u64| log.iter().filter(|l| l["phase"] == p).map(|l| l["seconds"].as_f64().unwrap()).fold(0.0, f64::max);
    let (t0, t1) = (end(0), end(1) - end(0));
    assert!(html.contains(&format!("{t0:.1} s (6 updates)")), "phase 1 time {t0:.1}");
    assert!(html.contains(&format!("{t1:.1} s (6 updates)")), "phase 2 time {t1:.1}");
    // Peak memory per phase as the trainer measured it.
    let mem = log.iter().filter_map(|l| l["memory"]["peak_rss_bytes"].as_u64()).next().unwrap();
    assert!(html.contains(&format!("{:.1} MiB", mem as f64 / (1u64 << 20) as f64)));
    // The recipe and the checkpoint's digest.
    assert!(html.contains("name = &quot;tiny-phased&quot;"));
    let m = MoeCheckpoint::open(&moe).unwrap();
    assert!(html.contains(&m.meta().digest));
    let side = std::fs::read_to_string(moe.with_extension("safetensors.sha256")).unwrap();
    assert!(html.contains(side.split_whitespace().next().unwrap()), "file sha256 from the sidecar");
    // The metrics of summary.json.
    let sm: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(html.contains(&format!("{:.4}", sm["energy"].as_f64().unwrap())));

    // Written again only with --force; the same run gives the same page.
    let o = run(&["report", &s(&out), "-o", &s(&page)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    run_ok(&["report", &s(&out), "-o", &s(&page), "--force"]);
    assert_eq!(std::fs::read_to_string(&page).unwrap(), html);
    // Default output: RUN_DIR/report.html.
    run_ok(&["report", &s(&out)]);
    assert!(out.join("report.html").is_file());

    chromium_check(&page, d.path());
}

#[test]
fn report_of_a_folder_of_runs_compares_them() {
    let d = tempfile::tempdir().unwrap();
    let a = train(d.path(), "tiny-phased", "[2, 4]");
    let b = train(d.path(), "tiny-dmd2", "[4]");
    let rows: Vec<(String, serde_json::Value)> = [&a, &b]
        .iter()
        .map(|r| {
            (
                r.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&std::fs::read_to_string(r.join("summary.json")).unwrap()).unwrap(),
            )
        })
        .collect();
    let page = phasekit::report::quickstart(d.path(), &rows).unwrap();
    assert_eq!(page, d.path().join("report.html"));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("id=\"comparison\"") && html.contains("id=\"run-0\"") && html.contains("id=\"run-1\""));
    assert!(html.contains("tiny-phased") && html.contains("tiny-dmd2"));
    assert_eq!(images(&html).len(), 4, "two plots per run (no metrics.png here)");
    let mj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("metrics.json")).unwrap()).unwrap();
    assert_eq!(mj["rows"].as_array().unwrap().len(), 2);
    assert!(!html.contains("id=\"checkpoint\""), "no checkpoint was assembled");
}

#[test]
fn report_of_a_transformer_run() {
    let d = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/wan2.2-tiny-2phase.toml");
    let out = d.path().join("wan");
    run_ok(&["train", "--recipe", &s(&recipe), "--out", &s(&out), "--quiet"]);
    let moe = d.path().join("wan.safetensors");
    run_ok(&["assemble", "--run", &s(&out), "-o", &s(&moe)]);
    let page = d.path().join("wan.html");
    run_ok(&["report", &s(&out), "-o", &s(&page)]);
    let html = std::fs::read_to_string(&page).unwrap();
    // The loss plot the trainer wrote; no sample plot (latents), said in words.
    assert_eq!(images(&html), vec![std::fs::read(out.join("plots/losses.png")).unwrap()]);
    assert!(html.contains("No sample plot"));
    assert!(html.contains("wan2.2-t2v-a14b"), "the model");
    for k in 0..2 {
        assert!(html.contains(&sha256_file(&out.join(format!("experts/expert-{k}.safetensors")))));
    }
    assert!(!html.contains("as recorded"), "transformer runs record no expert hashes to check against");
    assert!(html.contains("1000, 937.5") && html.contains("833.333, 625"), "timesteps");
    assert!(html.contains(&MoeCheckpoint::open(&moe).unwrap().meta().digest), "found beside the run");
    assert!(html.contains("high_noise · lora") || html.contains("e0 · lora"));
}

#[test]
fn report_refuses_bad_folders_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let page = d.path().join("r.html");
    let o = run(&["report", &s(&d.path().join("missing")), "-o", &s(&page)]);
    assert_eq!(o.code, Some(3), "{}", o.both());
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&["report", &s(&empty), "-o", &s(&page)]);
    assert_eq!(o.code, Some(2), "{}", o.both());
    assert!(o.stderr.contains("no manifest.json"), "{}", o.both());
    std::fs::write(empty.join("manifest.json"), "{\"format\": ").unwrap();
    let o = run(&["report", &s(&empty), "-o", &s(&page), "--json"]);
    assert_eq!(o.code, Some(5), "{}", o.both());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "malformed");
    assert!(v["error"]["path"].as_str().unwrap().ends_with("manifest.json"));
    std::fs::write(empty.join("manifest.json"), "{\"format\": \"phasekit.run/9\"}").unwrap();
    let o = run(&["report", &s(&empty), "-o", &s(&page)]);
    assert_eq!(o.code, Some(7), "{}", o.both());
    assert!(!o.panicked());
    assert!(!page.exists());
}

/// Open `page` in headless Chromium: take a screenshot, and check (with a copy of the page that
/// carries a small checking script) that every image decoded and nothing reported an error.
fn chromium_check(page: &Path, dir: &Path) {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        println!("skipped: headless Chromium check (no chromium; apt-get install chromium)");
        return;
    };
    let profile = dir.join("chromium-profile");
    let base = |extra: &[String]| {
        let mut c = Command::new(chromium);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
        ]);
        c.arg(format!("--user-data-dir={}", profile.display()));
        c.args(extra);
        c
    };
    // 1. A screenshot of the page as it is.
    let shot = dir.join("report.png");
    let url = format!("file://{}", page.display());
    let o = base(&[format!("--screenshot={}", shot.display()), "--window-size=1400,2400".into(), url.clone()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "chromium failed: {err}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "screenshot of {} bytes", png.len());
    let console: Vec<&str> = err.lines().filter(|l| l.contains("CONSOLE") || l.contains("Uncaught")).collect();
    assert!(console.is_empty(), "console output: {console:?}");
    if let Ok(keep) = std::env::var("PHASEKIT_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    // 2. The same page with a checker: errors of any kind are recorded from the first byte on, and
    //    after load every <img> must be complete with a natural size.
    let html = std::fs::read_to_string(page).unwrap();
    let probe = r#"<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || (e.target && e.target.outerHTML && e.target.outerHTML.slice(0, 80)))); }, true);
var __ce = console.error; console.error = function () { window.__errors.push(Array.from(arguments).join(' ')); __ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); }).length;
  var pre = document.createElement('pre'); pre.id = 'phasekit-check';
  pre.textContent = JSON.stringify({ images: imgs.length, broken: bad, errors: window.__errors, title: document.title });
  document.body.appendChild(pre);
});
</script>"#;
    let probed = dir.join("probed.html");
    std::fs::write(&probed, html.replacen("<head>", &format!("<head>\n{probe}"), 1)).unwrap();
    let o = base(&["--dump-dom".into(), "--virtual-time-budget=5000".into(), format!("file://{}", probed.display())]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dom = String::from_utf8_lossy(&o.stdout);
    let json = dom.split("<pre id=\"phasekit-check\">").nth(1).and_then(|r| r.split("</pre>").next()).expect("the checker ran");
    let v: serde_json::Value = serde_json::from_str(&json.replace("&quot;", "\"").replace("&amp;", "&")).unwrap();
    assert_eq!(v["images"], 2, "{v}");
    assert_eq!(v["broken"], 0, "{v}");
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    assert!(v["title"].as_str().unwrap().contains("tiny-phased"));
}
