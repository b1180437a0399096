//! `phasekit bench train-toy`: the paper's checkable claims on the toy (paper.md §6), over
//! several seeds, written as Markdown (`docs/results.md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::dmd;
use super::metrics::{self, Metrics};
use super::mixture::Mixture;
use super::mixture::MixtureConfig;
use super::optim::{AdamW, ParamsAdamW};
use super::recipe::{FakeObjective, FakeWeight, GeneratorWeight, Recipe, TeacherKind};
use super::rundir;
use super::schedule::{transition, Renoise, Rollout};
use super::toy::mlp::{class_cond, ExactMixture, Mlp};
use super::toy::{
    self,
    sample::{sample_denoiser, LoadedRun},
};
use super::TrainOptions;
use crate::error::{IoContext, Result};
use crate::model::denoiser::Denoiser;
use crate::rng::Rng;

/// A method of the comparison: a key, and how to build its recipe.
pub struct Method {
    pub key: &'static str,
    pub base: &'static str,
    pub tweak: fn(&mut Recipe),
}

pub const PHASED4: &str = include_str!("../../recipes/toy-phased-4step-4phase.toml");
pub const PHASED2: &str = include_str!("../../recipes/toy-phased-4step-2phase-sgts.toml");
pub const DMD2: &str = include_str!("../../recipes/toy-dmd2-4step.toml");
pub const VANILLA: &str = include_str!("../../recipes/toy-vanilla-4step.toml");
pub const ONESTEP: &str = include_str!("../../recipes/toy-onestep-dmd.toml");
pub const DMD2_T357: &str = include_str!("../../recipes/toy-dmd2-4step-t357.toml");
pub const DMD2_T882: &str = include_str!("../../recipes/toy-dmd2-4step-t882.toml");

/// The bench's methods. The first eight are the main table; the others are ablations run with
/// `--only`: the fake loss weight (`-eq13`: Eq. 13's weight on a baseline whose own loss is
/// DMD2's plain MSE), Eq. 10's generator weight (`-eq10`), and a fixed re-noise level
/// (`-t357`, `-t882`: the paper's App. C.2 values).
pub fn methods() -> Vec<Method> {
    vec![
        Method { key: "phased4", base: PHASED4, tweak: |_| {} },
        Method { key: "phased2-sgts", base: PHASED2, tweak: |_| {} },
        Method { key: "vanilla4", base: VANILLA, tweak: |_| {} },
        Method { key: "dmd2", base: DMD2, tweak: |_| {} },
        Method { key: "dmd2-euler", base: DMD2, tweak: |r| r.schedule.rollout = Rollout::Euler },
        Method { key: "onestep", base: ONESTEP, tweak: |_| {} },
        Method { key: "phased4-naive", base: PHASED4, tweak: |r| r.train.fake_objective = FakeObjective::Naive },
        Method { key: "phased4-disjoint", base: PHASED4, tweak: |r| r.schedule.renoise = Renoise::Disjoint },
        Method { key: "dmd2-eq13", base: DMD2, tweak: |r| r.train.fake_weight = FakeWeight::Eq13 },
        Method { key: "onestep-eq13", base: ONESTEP, tweak: |r| r.train.fake_weight = FakeWeight::Eq13 },
        Method { key: "phased4-eq10", base: PHASED4, tweak: |r| r.train.generator_weight = GeneratorWeight::Eq10 },
        Method { key: "phased2-sgts-eq10", base: PHASED2, tweak: |r| r.train.generator_weight = GeneratorWeight::Eq10 },
        Method { key: "dmd2-eq10", base: DMD2, tweak: |r| r.train.generator_weight = GeneratorWeight::Eq10 },
        Method { key: "dmd2-t357", base: DMD2_T357, tweak: |_| {} },
        Method { key: "dmd2-t882", base: DMD2_T882, tweak: |_| {} },
        Method { key: "onestep-t357", base: ONESTEP, tweak: |r| r.schedule.renoise_fixed = Some(0.357) },
        Method { key: "onestep-t882", base: ONESTEP, tweak: |r| r.schedule.renoise_fixed = Some(0.882) },
    ]
}

/// Keys of the main table (`bench train-toy` without `--only`).
pub const MAIN: [&str; 8] = ["phased4", "phased2-sgts", "vanilla4", "dmd2", "dmd2-euler", "onestep", "phased4-naive", "phased4-disjoint"];

/// Build a method's recipe for one seed and a total generator-update budget.
pub fn recipe_for(m: &Method, seed: u64, updates: u64, teacher: &Path) -> Result<Recipe> {
    let mut r = Recipe::parse(m.base, Path::new(m.key))?;
    (m.tweak)(&mut r);
    r.seed = seed;
    r.name = format!("{}-seed{seed}", m.key);
    r.teacher.kind = TeacherKind::Exact;
    r.teacher.checkpoint = Some(teacher.to_path_buf());
    let phases = r.schedule.build()?.phases.len() as u64;
    r.train.updates_per_phase = (updates / phases).max(1);
    r.train.updates.clear();
    r.train.checkpoint_every = 0;
    Ok(r)
}

/// The recipe the bench trains for method `m` and `seed`: [`recipe_for`] at the bench's budget,
/// on the bench's mixture (`--mixture`).
pub fn bench_recipe(m: &Method, seed: u64, o: &BenchOptions, teacher: &Path) -> Result<Recipe> {
    let mut r = recipe_for(m, seed, o.updates, teacher)?;
    if let Some(mx) = &o.mixture {
        r.mixture = mx.clone();
    }
    Ok(r)
}

/// Claim 1, directly: train a velocity MLP from scratch on `(s, 1]` with samples of the exact
/// `p_s` as the "generator" output, with Eq. 13 or the naive target; report its error against
/// the exact velocity and the energy distance of its Euler samples at `s` to the exact `p_s`.
pub fn fake_objective_experiment(mix: &Mixture, r: &Recipe, objective: FakeObjective, s: f64, steps: u64, seed: u64) -> Result<(f64, f64)> {
    let mut rng = Rng::new(seed ^ 0xFA4E);
    let model = Mlp::new(&r.mlp, mix.dim, mix.classes, &mut rng)?;
    let params = ParamsAdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(model.vars.clone(), params)?;
    let n = 256;
    let d = mix.dim;
    let f = |v: Vec<f64>, shape: (usize, usize)| Tensor::from_vec(v.iter().map(|x| *x as f32).collect::<Vec<f32>>(), shape, &Device::Cpu);
    for step in 0..steps {
        let (x0, cls, _) = mix.sample(n, &mut rng);
        let mut xs = vec![0.0; n * d];
        let mut xt = vec![0.0; n * d];
        let mut target = vec![0.0; n * d];
        let mut w = vec![0.0; n];
        let mut ts = vec![0.0; n];
        for i in 0..n {
            let t = s + (1.0 - s) * rng.uniform_open0();
            let (a, sg) = transition(s, t);
            ts[i] = t;
            // The trainer's own Eq. 11 target and Eq. 13 weight.
            let tg = dmd::subinterval_target(s, t, 10.0);
            w[i] = match objective {
                FakeObjective::Subinterval => tg.weight,
                FakeObjective::Naive => 1.0,
            };
            for j in 0..d {
                let k = i * d + j;
                xs[k] = (1.0 - s) * x0[k] + s * rng.normal();
                let e = rng.normal();
                xt[k] = a * xs[k] + sg * e;
                target[k] = match objective {
                    FakeObjective::Subinterval => tg.value(e, xs[k]),
                    FakeObjective::Naive => e - xs[k],
                };
            }
        }
        let pred = model.velocity(&f(xt, (n, d))?, &f(ts, (n, 1))?.flatten_all()?, &class_cond(cls)?)?;
        let per = (pred - f(target, (n, d))?).and_then(|e| e.sqr()).and_then(|e| e.mean(1))?;
        let loss = (per * f(w, (n, 1))?.flatten_all()?).and_then(|l| l.mean_all())?;
        opt.params.lr = if step * 2 < steps { 1e-3 } else { 1e-3 * 2.0 * (1.0 - step as f64 / steps as f64) };
        opt.step(&loss.backward()?, 1.0)?;
    }
    // Relative error against the exact velocity on p_t, t ∈ (s, 1].
    let m = 2000;
    let mut num = 0.0;
    let mut den = 0.0;
    let (x0, cls, _) = mix.sample(m, &mut rng);
    let mut xt = vec![0.0; m * d];
    let mut ts = vec![0.0; m];
    for i in 0..m {
        let t = s + (1.0 - s) * rng.uniform_open0();
        ts[i] = t;
        for j in 0..d {
            xt[i * d + j] = (1.0 - t) * x0[i * d + j] + t * rng.normal();
        }
    }
    let exact = mix.velocity_batch(&xt, &ts, &cls, 1.0);
    let pred = model.frozen().velocity(&f(xt, (m, d))?, &f(ts, (m, 1))?.flatten_all()?, &class_cond(cls)?)?;
    let pred = metrics::to_rows(&pred);
    for (p, e) in pred.iter().zip(&exact) {
        num += (p - e) * (p - e);
        den += e * e;
    }
    // Euler from 1 to s with the learned velocity vs exact samples of p_s.
    let z = dmd::noise(&mut rng, m, &[d])?;
    let cls = mix.sample_classes(m, &mut rng);
    let cond = class_cond(cls.clone())?;
    let frozen = model.frozen();
    let k = 50;
    let sig: Vec<f64> = (0..=k).map(|i| 1.0 - (1.0 - s) * i as f64 / k as f64).collect();
    let by: Vec<&dyn Denoiser> = vec![&frozen; k];
    let xs = metrics::to_rows(&dmd::sample(&by, &sig, z, &cond)?);
    let (y0, _, _) = mix.sample(m, &mut rng);
    let ys: Vec<f64> = y0.iter().map(|x| (1.0 - s) * x + s * rng.normal()).collect();
    Ok(((num / den).sqrt(), metrics::energy_distance(&xs, &ys, d)))
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, sd)
}

fn fmt(v: &[f64], p: usize) -> String {
    let (m, s) = mean_sd(v);
    format!("{m:.p$} ± {s:.p$}")
}

/// Options of the benchmark.
pub struct BenchOptions {
    pub seeds: u64,
    pub updates: u64,
    pub eval_samples: usize,
    pub dir: PathBuf,
    pub only: Option<Vec<String>>,
    /// Replaces every method's mixture (and the teacher's): `--mixture RECIPE` takes a recipe's
    /// `[mixture]`, e.g. the unequal mode weights of `toy-phased-4step-4phase-weighted.toml`.
    pub mixture: Option<MixtureConfig>,
}

/// Metrics, seconds and method label of one run.
type RunResult = (Metrics, f64, String);

fn one_run(m: &Method, s: u64, o: &BenchOptions, teacher_file: &Path, mix: &Mixture, n: usize) -> Result<RunResult> {
    let r = bench_recipe(m, s, o, teacher_file)?;
    let label = toy::method_name(&r, &r.schedule.build()?);
    let dir = o.dir.join(&r.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_file(&dir)?;
    }
    let text = r.to_toml();
    let opts = TrainOptions { eval_samples: 0, ..Default::default() };
    let tr = Instant::now();
    super::train(&r, &text, &dir, &opts, &|_| {})?;
    let secs = tr.elapsed().as_secs_f64();
    let lr = LoadedRun::open(&dir)?;
    let x = lr.sample(n, None, s ^ 0xE7A1, None)?;
    Ok((metrics::evaluate(&x, mix, s ^ 0xE7A1 ^ 0x5EED), secs, label))
}

/// Run everything and return the Markdown report.
pub fn run_all(o: &BenchOptions, say: &(dyn Fn(&str) + Sync)) -> Result<String> {
    let t0 = Instant::now();
    if let Some(k) = o.only.iter().flatten().find(|k| !methods().iter().any(|m| m.key == k.as_str())) {
        let keys: Vec<&str> = methods().iter().map(|m| m.key).collect();
        return Err(crate::Error::usage(format!(
            "bench train-toy: unknown method '{}' (methods: {})",
            crate::error::clean(k),
            keys.join(", ")
        )));
    }
    std::fs::create_dir_all(&o.dir).with_file(&o.dir)?;
    let mut base = Recipe::parse(PHASED4, Path::new("phased4"))?;
    if let Some(mx) = &o.mixture {
        base.mixture = mx.clone();
    }
    let mix = Mixture::new(&base.mixture)?;
    // One MLP teacher (flow matching), shared by every run as the initialisation.
    let teacher_file = o.dir.join("teacher.safetensors");
    let tt = Instant::now();
    let teacher = toy::pretrain_teacher(&base, &mix, &|_, _, _| {})?;
    rundir::write_tensors(&teacher_file, &teacher.named_tensors(), &[])?;
    say(&format!("teacher pretrained in {:.1} s", tt.elapsed().as_secs_f64()));
    let teacher = teacher.frozen();
    let exact = ExactMixture { mixture: mix.clone() };
    let n = o.eval_samples;
    let seeds: Vec<u64> = (0..o.seeds).collect();
    let mut rows: Vec<(String, String, Vec<Metrics>, Vec<f64>)> = Vec::new();
    let mut ref_rows: Vec<(String, Vec<Metrics>)> = Vec::new();
    for (label, which) in [
        ("exact mixture, independent draw", 0),
        ("exact velocity, 100 Euler steps", 1),
        ("MLP teacher, 100 Euler steps", 2),
        ("MLP teacher, 4 Euler steps", 3),
    ] {
        let mut ms = Vec::new();
        for &s in &seeds {
            let seed = s ^ 0xE7A1;
            let m = match which {
                0 => metrics::evaluate_rows(&mix.sample(n, &mut Rng::new(seed)).0, &mix, seed ^ 0x5EED),
                1 => metrics::evaluate(&sample_denoiser(&exact, &mix, n, 100, 1.0, seed)?, &mix, seed ^ 0x5EED),
                2 => metrics::evaluate(&sample_denoiser(&teacher, &mix, n, 100, 1.0, seed)?, &mix, seed ^ 0x5EED),
                _ => metrics::evaluate(&sample_denoiser(&teacher, &mix, n, 4, 1.0, seed)?, &mix, seed ^ 0x5EED),
            };
            ms.push(m);
        }
        ref_rows.push((label.to_string(), ms));
    }
    // Every (method, seed) run is independent: run them on all cores, one thread each.
    let ms_all: Vec<Method> = methods()
        .into_iter()
        .filter(|m| match &o.only {
            Some(k) => k.iter().any(|k| k == m.key),
            None => MAIN.contains(&m.key),
        })
        .collect();
    let jobs: Vec<(usize, u64)> = (0..ms_all.len()).flat_map(|i| seeds.iter().map(move |s| (i, *s))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<RunResult>>>> = std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(mi, s)) = jobs.get(j) else { break };
                let res = one_run(&ms_all[mi], s, o, &teacher_file, &mix, n);
                if let Ok((met, secs, _)) = &res {
                    say(&format!(
                        "{:<18} seed {s}: energy {:.4}, mmd {:.4}, modes {}/{}, weight err {:.3}, outliers {:.4}, spread {:.3}, diversity {:.3} ({secs:.0} s)",
                        ms_all[mi].key,
                        met.energy,
                        met.mmd,
                        met.modes_covered,
                        met.modes,
                        met.mode_weight_error,
                        met.outliers,
                        met.spread,
                        met.diversity
                    ));
                }
                results.lock().expect("no poisoned lock")[j] = Some(res);
            });
        }
    });
    let results = results.into_inner().expect("no poisoned lock");
    for (i, m) in ms_all.iter().enumerate() {
        let mut ms = Vec::new();
        let mut secs = Vec::new();
        let mut label = String::new();
        for (j, job) in jobs.iter().enumerate() {
            if job.0 == i {
                let (met, t, l) =
                    results[j].as_ref().expect("every job ran").as_ref().map_err(|e| crate::Error::new(e.kind(), e.to_string()))?;
                ms.push(met.clone());
                secs.push(*t);
                label = l.clone();
            }
        }
        rows.push((m.key.to_string(), label, ms, secs));
    }
    // Claim 1 directly.
    let mut fo: Vec<(f64, f64, f64, f64)> = Vec::new();
    if o.only.is_none() {
        for &s in &seeds {
            let (a, b) = std::thread::scope(|sc| {
                let a = sc.spawn(|| fake_objective_experiment(&mix, &base, FakeObjective::Subinterval, 0.5, 1500, s));
                let b = fake_objective_experiment(&mix, &base, FakeObjective::Naive, 0.5, 1500, s);
                (a.join().expect("no panic"), b)
            });
            let (a, b) = (a?, b?);
            say(&format!(
                "fake objective seed {s}: Eq.13 rel. err {:.3} energy {:.4}; naive rel. err {:.3} energy {:.4}",
                a.0, a.1, b.0, b.1
            ));
            fo.push((a.0, a.1, b.0, b.1));
        }
    }
    Ok(report(o, &ref_rows, &rows, &fo, t0.elapsed().as_secs_f64()))
}

fn col(ms: &[Metrics], f: fn(&Metrics) -> f64) -> Vec<f64> {
    ms.iter().map(f).collect()
}

fn report(
    o: &BenchOptions,
    refs: &[(String, Vec<Metrics>)],
    rows: &[(String, String, Vec<Metrics>, Vec<f64>)],
    fo: &[(f64, f64, f64, f64)],
    secs: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| sampler | energy distance | MMD² | modes covered | mode-weight error | outliers | within-mode spread | diversity | train s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let line = |s: &mut String, name: &str, ms: &[Metrics], t: Option<&[f64]>| {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(&col(ms, |m| m.energy), 4),
            fmt(&col(ms, |m| m.mmd), 4),
            fmt(&col(ms, |m| m.modes_covered as f64), 2),
            fmt(&col(ms, |m| m.mode_weight_error), 3),
            fmt(&col(ms, |m| m.outliers), 3),
            fmt(&col(ms, |m| m.spread), 2),
            fmt(&col(ms, |m| m.diversity), 3),
            t.map_or("–".to_string(), |t| fmt(t, 0)),
        );
    };
    for (n, ms) in refs {
        line(&mut s, n, ms, None);
    }
    for (k, label, ms, t) in rows {
        line(&mut s, &format!("{label} (`{k}`)"), ms, Some(t));
    }
    if !fo.is_empty() {
        let _ = writeln!(s, "\nFake-score objective on (s, 1], s = 0.5, MLP from scratch, samples of the exact p_s as generator output:\n");
        let _ =
            writeln!(s, "| objective | relative error vs exact velocity on (s, 1] | energy distance of Euler samples at s to exact p_s |");
        let _ = writeln!(s, "|---|---|---|");
        let a: Vec<f64> = fo.iter().map(|x| x.0).collect();
        let b: Vec<f64> = fo.iter().map(|x| x.1).collect();
        let c: Vec<f64> = fo.iter().map(|x| x.2).collect();
        let d: Vec<f64> = fo.iter().map(|x| x.3).collect();
        let _ = writeln!(s, "| Eq. 11/13 subinterval target | {} | {} |", fmt(&a, 3), fmt(&b, 4));
        let _ = writeln!(s, "| naive ε − x_s | {} | {} |", fmt(&c, 3), fmt(&d, 4));
    }
    let mx = match &o.mixture {
        None => "the default mixture".to_string(),
        Some(m) => format!(
            "mixture: {} modes on a ring of radius {}, std {}, {} classes, weights {}",
            m.modes,
            m.radius,
            m.std,
            m.classes,
            if m.weights.is_empty() { "equal".to_string() } else { format!("∝ {:?}", m.weights) }
        ),
    };
    let _ = writeln!(
        s,
        "\n{} seeds, {} generator updates per run (split evenly over phases), TTUR 5, batch 256, {} samples per evaluation; exact teacher; {mx}; {:.0} s in all.",
        o.seeds, o.updates, o.eval_samples, secs
    );
    s
}

/// Rows by key, for tests and claims.
pub fn by_key<'a>(rows: &'a [(String, String, Vec<Metrics>, Vec<f64>)], k: &str) -> Option<&'a [Metrics]> {
    rows.iter().find(|r| r.0 == k).map(|r| r.2.as_slice())
}
