//! Claims of docs/results.md that hold at a test's budget, checked by real training at a small budget: the bench's
//! methods and recipes (exact mixture as the real score, MLP teacher as initialisation), fewer
//! updates and a smaller batch than the docs table, fixed seeds. The margins were chosen from
//! sweeps over several seeds (`cargo test --release --test train_claims -- --ignored --nocapture`
//! prints one), not from a single run.

use std::path::Path;

use phasekit::train::experiments::{methods, recipe_for, PHASED4};
use phasekit::train::metrics::{self, Metrics};
use phasekit::train::mixture::Mixture;
use phasekit::train::recipe::Recipe;
use phasekit::train::rundir as run;
use phasekit::train::toy::sample::LoadedRun;
use phasekit::train::TrainOptions;

/// Generator updates per run (split over phases) and batch size of the claims' runs.
const UPDATES: u64 = 400;
const BATCH: usize = 128;
/// Teacher pretraining steps (the bench uses 1500).
const PRETRAIN: u64 = 800;
/// Samples per evaluation.
const EVAL: usize = 2000;

fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(phasekit::train::single_threaded_kernels);
}

/// Pretrain the MLP teacher once per seed into `dir`.
fn teacher(dir: &Path, seed: u64) -> (std::path::PathBuf, Mixture) {
    let mut base = Recipe::parse(PHASED4, Path::new("phased4")).unwrap();
    base.seed = seed;
    base.teacher.pretrain.steps = PRETRAIN;
    let mix = Mixture::new(&base.mixture).unwrap();
    let t = phasekit::train::toy::pretrain_teacher(&base, &mix, &|_, _, _| {}).unwrap();
    let f = dir.join(format!("teacher-{seed}.safetensors"));
    run::write_tensors(&f, &t.named_tensors(), &[]).unwrap();
    (f, mix)
}

/// A budget override for the sweep (`CLAIMS_UPDATES`, `CLAIMS_BATCH`), else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Train method `key` at the claims' budget and evaluate it as the bench does.
fn train(key: &str, seed: u64, dir: &Path, teacher: &Path, mix: &Mixture) -> Metrics {
    train_at(key, seed, dir, teacher, mix, env_or("CLAIMS_UPDATES", UPDATES), env_or("CLAIMS_BATCH", BATCH))
}

/// [`train`] at `updates` generator updates of batch `batch`.
fn train_at(key: &str, seed: u64, dir: &Path, teacher: &Path, mix: &Mixture, updates: u64, batch: usize) -> Metrics {
    let m = methods().into_iter().find(|m| m.key == key).unwrap();
    let mut r = recipe_for(&m, seed, updates, teacher).unwrap();
    r.train.batch = batch;
    r.train.log_every = 0;
    let out = dir.join(format!("{key}-{seed}"));
    phasekit::train::train(&r, &r.to_toml(), &out, &TrainOptions::default(), &|_| {}).unwrap();
    let x = LoadedRun::open(&out).unwrap().sample(EVAL, None, seed ^ 0xE7A1, None).unwrap();
    metrics::evaluate(&x, mix, seed ^ 0xE7A1 ^ 0x5EED)
}

/// Train every method of `keys` on one seed, one thread each (their kernels are single-threaded).
fn runs(keys: &[&str], seed: u64) -> Vec<Metrics> {
    setup();
    let d = tempfile::tempdir().unwrap();
    let (t, mix) = teacher(d.path(), seed);
    std::thread::scope(|sc| {
        let hs: Vec<_> = keys.iter().map(|k| sc.spawn(|| train(k, seed, d.path(), &t, &mix))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn show(keys: &[&str], ms: &[Metrics]) -> String {
    keys.iter()
        .zip(ms)
        .map(|(k, m)| {
            format!(
                "{k}: energy {:.4} modes {}/{} spread {:.2} outliers {:.3} diversity {:.3}",
                m.energy, m.modes_covered, m.modes, m.spread, m.outliers, m.diversity
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Claims 2, 3 and 5 on seed 0's runs of `phased4`, `dmd2` and `onestep` (trained side by side).
///
/// Sweeps (batch 128): Phased DMD's energy distance was 0.03–0.38× DMD2's (x0-renoise rollout,
/// seeds 0–5 at 400 updates; with the older Euler rollout 0.02–0.54× at 400 updates, seeds 0–3,
/// and 0.47–0.75× at 1000, seeds 0–2); every Phased DMD run covered 8/8 modes. Claim 2 (DMD2 at
/// about one-step level): with the baselines' DMD2 plain fake loss and the mean generator loss
/// (issue 15), DMD2's energy was 0.62–2.0× one-step DMD's on seeds 0–5 at 400 updates (seed 0:
/// 0.0081 vs 0.0080; lower than one-step on seed 3), and 8/8 modes for both everywhere; Phased
/// DMD was 0.04–0.37× DMD2's. The older code (Eq. 13 fake weight on DMD2, summed generator loss)
/// gave 1.23–2.93×, which the old assertion "DMD2 strictly worse" relied on; the paper says
/// "about one-step level", which is what is asserted now.
/// Not asserted, because they do not hold reliably at this budget (docs/results.md): the
/// within-mode-spread half of claim 3 (Phased DMD 1.18–1.29, DMD2 1.24–1.56 at 400 updates:
/// both over-disperse). Claim 4 has its own test below, at a larger budget.
#[test]
fn claims_2_3_and_5_phased_dmd_beats_dmd2_which_falls_to_one_step_level() {
    let keys = ["phased4", "dmd2", "onestep"];
    let ms = runs(&keys, 0);
    let (phased, dmd2, onestep) = (&ms[0], &ms[1], &ms[2]);
    let all = show(&keys, &ms);
    eprintln!("claims 2, 3, 5: {all}");
    // (2) 4-step DMD2 (SGTS, x0-renoise) falls to about one-step DMD's level (the paper: SGTS
    // brings diversity and mode coverage down to one-step level, not below it): the same modes
    // covered, and an energy distance within a factor 2.5 of one-step DMD's either way.
    assert_eq!(dmd2.modes_covered, onestep.modes_covered, "claim 2: {all}");
    let ratio = dmd2.energy / onestep.energy;
    assert!(ratio > 1.0 / 2.5 && ratio < 2.5, "claim 2: DMD2 / one-step energy = {ratio:.2}; {all}");
    // (3) Phased DMD 4-phase beats DMD2 at 4 steps on energy distance.
    assert!(phased.energy < 0.75 * dmd2.energy, "claim 3: {all}");
    // (5) 4-step Phased DMD covers at least 95 % of the teacher's modes (all 8 of 8).
    assert!(phased.modes_covered as f64 >= 0.95 * phased.modes as f64, "claim 5: {all}");
}

/// Generator updates of the claim-4 runs (same batch): the over-dispersion of disjoint intervals
/// shows once Phased DMD has trained past its own (at 400 updates both sit at spread 1.17–1.30).
const UPDATES_4: u64 = 1000;

/// Claim 4 on seed 0: with disjoint re-noise intervals the student over-disperses inside the
/// modes; with reverse-nested ones its within-mode spread is lower (closer to the mixture's 1).
///
/// Sweep at 1000 updates, batch 128, seeds 0–5: spread nested 1.10–1.19, disjoint 1.16–1.25,
/// disjoint higher by 0.05–0.10 on every seed (seed 0: 1.16 vs 1.22); energy distance nested lower
/// on 6 of 6. At 2000 updates and batch 256 over 20 seeds (docs/results.md) the gap is 1.02 vs
/// 1.14, nested closer to 1 on 20 of 20. The energy distance is not asserted: over 20 seeds it
/// favours nested on only 11 (disjoint fails badly on a few seeds rather than on all).
#[test]
fn claim_4_reverse_nested_intervals_keep_the_modes_tighter_than_disjoint_ones() {
    setup();
    let keys = ["phased4", "phased4-disjoint"];
    let d = tempfile::tempdir().unwrap();
    let (t, mix) = teacher(d.path(), 0);
    let ms: Vec<Metrics> = std::thread::scope(|sc| {
        let hs: Vec<_> = keys.iter().map(|k| sc.spawn(|| train_at(k, 0, d.path(), &t, &mix, UPDATES_4, BATCH))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = show(&keys, &ms);
    eprintln!("claim 4: {all}");
    assert!(ms[1].spread > ms[0].spread + 0.025, "claim 4: {all}");
}

/// Seed sweep for choosing the budget and margins: prints every method's metrics per seed.
#[test]
#[ignore = "minutes in release; run by hand to re-check the margins"]
fn sweep() {
    // CLAIMS_KEYS=dmd2,onestep picks the methods (default: the four below); CLAIMS_SEEDS the
    // number of seeds (default 4); CLAIMS_UPDATES and CLAIMS_BATCH the budget (default 400, 128).
    let keys_env = std::env::var("CLAIMS_KEYS").unwrap_or_else(|_| "phased4,dmd2,onestep,phased4-disjoint".into());
    let keys: Vec<&str> = keys_env.split(',').map(str::trim).collect();
    let seeds: u64 = std::env::var("CLAIMS_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    for seed in 0..seeds {
        let ms = runs(&keys, seed);
        println!("seed {seed}: {}", show(&keys, &ms));
    }
}
