//! The embedded trainer on the toy mixture: analytic checks, resume bit-exactness, outputs,
//! recipes, and the paper's claims at a small budget (fixed seeds, margins real training meets).

use std::path::{Path, PathBuf};

use phasekit::rng::Rng;
use phasekit::train::dmd::{subinterval_target, SubintervalTarget};
use phasekit::train::mixture::{Mixture, MixtureConfig};
use phasekit::train::recipe::Recipe;
use phasekit::train::schedule::transition;
use phasekit::train::toy::sample::LoadedRun;
use phasekit::train::TrainOptions;
use phasekit::Kind;

/// candle's kernels on one thread per test (see `single_threaded_kernels`).
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(phasekit::train::single_threaded_kernels);
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A recipe small enough for a test: narrow MLP, few updates, short teacher pretraining.
fn tiny(phases: &[usize], updates: u64) -> Recipe {
    let text = std::fs::read_to_string(repo().join("recipes/toy-phased-4step-4phase.toml")).unwrap();
    let mut r = Recipe::parse(&text, Path::new("tiny")).unwrap();
    r.mlp.width = 32;
    r.mlp.depth = 2;
    r.teacher.pretrain.steps = 60;
    r.teacher.pretrain.batch = 128;
    r.schedule.phases = phases.to_vec();
    r.train.updates_per_phase = updates;
    r.train.batch = 64;
    r.train.ttur = 2;
    r.train.checkpoint_every = 4;
    r.train.keep_checkpoints = 2;
    r.train.log_every = 1;
    r
}

/// Samples of x_s from the exact posterior p(x_s | x_t) of the mixture (every component stays Gaussian).
fn posterior_xs(mix: &Mixture, xt: &[f64], s: f64, t: f64, n: usize, rng: &mut Rng) -> Vec<Vec<f64>> {
    let (a, sg) = transition(s, t);
    let d = mix.dim;
    let mut logw = Vec::new();
    let mut comps = Vec::new();
    for k in 0..mix.modes() {
        let tau2 = (1.0 - s).powi(2) * mix.stds[k].powi(2) + s * s;
        let m: Vec<f64> = mix.means[k].iter().map(|m| (1.0 - s) * m).collect();
        let var_t = a * a * tau2 + sg * sg;
        let r2: f64 = xt.iter().zip(&m).map(|(x, m)| (x - a * m).powi(2)).sum();
        logw.push(mix.weights[k].ln() - 0.5 * d as f64 * var_t.ln() - 0.5 * r2 / var_t);
        let prec = 1.0 / tau2 + a * a / (sg * sg);
        let mean: Vec<f64> = m.iter().zip(xt).map(|(m, x)| (m / tau2 + a * x / (sg * sg)) / prec).collect();
        comps.push((mean, (1.0 / prec).sqrt()));
    }
    let mx = logw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logw.iter().map(|l| (l - mx).exp()).collect();
    (0..n)
        .map(|_| {
            let k = rng.categorical(&w);
            comps[k].0.iter().map(|m| m + comps[k].1 * rng.normal()).collect()
        })
        .collect()
}

/// How far (in standard errors) the conditional mean E[target | x_t] of a target built from the
/// trainer's [`subinterval_target`] coefficients is from the exact velocity, worst case over
/// three re-noise levels and both dimensions; `mutate` edits the coefficients (identity: the
/// trainer's own target).
fn eq11_bias(mutate: &dyn Fn(SubintervalTarget) -> SubintervalTarget) -> (f64, f64) {
    let mix = Mixture::new(&MixtureConfig { classes: 1, ..Default::default() }).unwrap();
    let mut rng = Rng::new(3);
    let s = 0.5;
    let m = 200_000;
    let (mut off, mut naive_off) = (0.0f64, 0.0f64);
    for (t, xt) in [(0.55, [0.9, 0.2]), (0.7, [-0.5, 0.8]), (0.9, [0.1, -0.3])] {
        let (a, sg) = transition(s, t);
        let tg = mutate(subinterval_target(s, t, 10.0));
        let mut v = [0.0; 2];
        mix.velocity(&xt, t, 1, &mut v);
        let xs = posterior_xs(&mix, &xt, s, t, m, &mut rng);
        for j in 0..2 {
            let (mut sum, mut sq, mut naive) = (0.0, 0.0, 0.0);
            for x in &xs {
                let eps = (xt[j] - a * x[j]) / sg;
                let target = tg.value(eps, x[j]);
                sum += target;
                sq += target * target;
                naive += eps - x[j];
            }
            let mean = sum / m as f64;
            let sd = (sq / m as f64 - mean * mean).sqrt();
            let se = sd / (m as f64).sqrt();
            off = off.max((mean - v[j]).abs() / se);
            naive_off = naive_off.max((naive / m as f64 - v[j]).abs() / se);
        }
    }
    (off, naive_off)
}

/// Claim 1, analytically, on the trainer's own target ([`subinterval_target`], which the fake
/// update calls): E[target | x_t] over exact posterior draws of x_s is the exact velocity
/// (within 4 standard errors); the naive target ε − x_s is not.
#[test]
fn eq11_target_has_the_exact_velocity_as_conditional_mean_and_the_naive_one_does_not() {
    setup();
    let (off, naive_off) = eq11_bias(&|t| t);
    assert!(off < 4.0, "E[target|x_t] is {off} standard errors from the exact velocity");
    assert!(naive_off > 10.0, "the naive target ε − x_s should be biased by many standard errors, got {naive_off}");
}

/// The check above has the power to catch a slip in the formula (issue 15, defect 5): a sign
/// or a factor of 2 in either coefficient of the target puts its conditional mean many standard
/// errors off. (Each edit was also made in `subinterval_target` itself: this file's Eq. 11 test
/// and `dmd::tests::subinterval_target_is_eq13_as_written` then failed.)
#[test]
fn a_sign_or_factor_slip_in_the_eq11_target_is_caught() {
    setup();
    type Slip = fn(SubintervalTarget) -> SubintervalTarget;
    let slips: [(&str, Slip); 4] = [
        ("−ε coefficient", |t| SubintervalTarget { eps: -t.eps, ..t }),
        ("+x_s coefficient", |t| SubintervalTarget { xs: -t.xs, ..t }),
        ("2× ε coefficient", |t| SubintervalTarget { eps: 2.0 * t.eps, ..t }),
        ("½× x_s coefficient", |t| SubintervalTarget { xs: 0.5 * t.xs, ..t }),
    ];
    for (what, slip) in slips {
        let (off, _) = eq11_bias(&slip);
        assert!(off > 10.0, "{what}: only {off} standard errors off");
    }
}

#[test]
fn resume_after_a_stop_is_bit_identical() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let r = tiny(&[1, 2, 3, 4], 6);
    let text = r.to_toml();
    let full = d.path().join("full");
    let o = TrainOptions { eval_samples: 0, ..Default::default() };
    let s = phasekit::train::train(&r, &text, &full, &o, &|_| {}).unwrap();
    assert!(s.completed && s.global_step == 24);
    for stop in [9u64, 12] {
        let part = d.path().join(format!("part{stop}"));
        let s = phasekit::train::train(&r, &text, &part, &TrainOptions { stop_after: Some(stop), ..o.clone() }, &|_| {}).unwrap();
        assert!(!s.completed && s.global_step == stop);
        let s = phasekit::train::train(&r, &text, &part, &TrainOptions { resume: true, ..o.clone() }, &|_| {}).unwrap();
        assert!(s.completed);
        assert_eq!(s.resumed_from, Some(if stop == 9 { 6 } else { 12 }), "checkpoints every 4 updates of a phase and at its end");
        for k in 0..4 {
            let f = format!("experts/expert-{k}.safetensors");
            assert!(std::fs::read(full.join(&f)).unwrap() == std::fs::read(part.join(&f)).unwrap(), "{f} differs after resume at {stop}");
        }
        let log = std::fs::read_to_string(part.join("log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 24, "log lines after resume");
    }
    // A different recipe cannot resume this run; a non-empty folder needs --resume.
    let mut other = r.clone();
    other.seed = 5;
    let e = phasekit::train::train(&other, &other.to_toml(), &full, &TrainOptions { resume: true, ..o.clone() }, &|_| {}).unwrap_err();
    assert_eq!(e.kind(), Kind::Inconsistent);
    let e = phasekit::train::train(&r, &text, &full, &o, &|_| {}).unwrap_err();
    assert_eq!(e.kind(), Kind::Usage);
}

#[test]
fn run_folder_manifest_and_sampling() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let r = tiny(&[2, 4], 4);
    let out = d.path().join("run");
    phasekit::train::train(&r, &r.to_toml(), &out, &TrainOptions { eval_samples: 200, ..Default::default() }, &|_| {}).unwrap();
    for f in [
        "recipe.toml",
        "teacher.safetensors",
        "log.jsonl",
        "manifest.json",
        "summary.json",
        "plots/samples.png",
        "plots/losses.png",
        "experts/expert-0.safetensors",
        "experts/expert-1.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let run = LoadedRun::open(&out).unwrap();
    let m = &run.manifest;
    assert_eq!(m.experts.len(), 2);
    // Phase 1 owns (0.5, 1]: its range starts at the float right above 0.5.
    let above_half = f64::from_bits(0.5f64.to_bits() + 1);
    assert_eq!(m.experts[0].sigma_range, [above_half, 1.0]);
    assert_eq!(m.experts[1].sigma_range, [0.0, above_half]);
    assert_eq!(m.experts[0].timesteps, vec![1000.0, 750.0]);
    assert_eq!(m.teacher.sha256.len(), 64);
    assert_eq!(run.route(1.0), 0);
    assert_eq!(run.route(0.75), 0);
    assert_eq!(run.route(0.6), 0, "off the grid, inside phase 1's interval");
    assert_eq!(run.route(0.5), 1);
    // The sample command writes a [N, d] tensor that the reference safetensors reader opens.
    let bin = env!("CARGO_BIN_EXE_phasekit");
    let samples = d.path().join("s.safetensors");
    let o =
        std::process::Command::new(bin).args(["sample", "--run"]).arg(&out).args(["--n", "50", "--out"]).arg(&samples).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&samples).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("samples").unwrap();
    assert_eq!(t.shape(), &[50, 2]);
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    // Tampering with an expert is caught.
    let e = out.join("experts/expert-1.safetensors");
    let mut b = std::fs::read(&e).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&e, b).unwrap();
    assert_eq!(LoadedRun::open(&out).err().unwrap().kind(), Kind::Integrity);
}

#[test]
fn every_recipe_parses_and_transformer_recipes_without_a_teacher_fail_naming_it() {
    setup();
    let mut n = 0;
    for e in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        let (r, text) = Recipe::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        n += 1;
        let tiny = r.name.contains("tiny");
        if !r.is_toy() && !tiny {
            // The full-size recipes name teachers that are not in the repository: a clear I/O
            // error (exit 3) naming the missing path, before anything is written.
            let d = tempfile::tempdir().unwrap();
            let e = phasekit::train::train(&r, &text, &d.path().join("run"), &TrainOptions::default(), &|_| {}).unwrap_err();
            assert_eq!(e.kind(), Kind::Io, "{e}");
            assert!(e.to_string().contains("teacher checkpoint not found"), "{e}");
            assert!(!d.path().join("run").exists());
            assert_eq!(r.schedule.steps, 4);
            assert_eq!(r.train.betas, [0.0, 0.999]);
            assert_eq!(r.train.ttur, 5);
        }
    }
    assert!(n >= 11, "{n} recipes");
    let e = Recipe::parse("[train]\nbatchsize = 3\n", Path::new("x.toml")).unwrap_err();
    assert_eq!(e.kind(), Kind::Malformed);
    assert!(Recipe::parse("[schedule]\nsteps = 4\nphases = [1, 3]\n", Path::new("x.toml")).is_err());
}

/// `schedule.rollout = "x0-renoise"` (DMD2's rule): the run records it as its solver, `sample
/// --run` steps by it (x̂₀ = x − σ·v, then fresh noise to the next σ, from the sampling seed's
/// generator after the classes), an assembled checkpoint samples the same bits, and Euler
/// recipes serialise without the field (their recipe text and digests are unchanged).
#[test]
fn x0_renoise_rollout_is_recorded_and_sampled_by_its_rule() {
    use candle_core::Tensor;
    use phasekit::model::denoiser::Denoiser;
    use phasekit::train::dmd;
    use phasekit::train::schedule::Rollout;
    use phasekit::train::toy::mlp::class_cond;
    use phasekit::train::toy::sample::LoadedMoe;
    setup();
    let d = tempfile::tempdir().unwrap();
    let euler = tiny(&[4], 4);
    assert!(!euler.to_toml().contains("rollout"), "an Euler recipe's text has no rollout field");
    let mut r = euler.clone();
    r.schedule.sgts = true;
    r.schedule.rollout = Rollout::X0Renoise;
    let text = r.to_toml();
    assert!(text.contains("rollout = \"x0-renoise\""), "{text}");
    assert_eq!(Recipe::parse(&text, Path::new("x.toml")).unwrap(), r);
    let out = d.path().join("run");
    phasekit::train::train(&r, &text, &out, &TrainOptions::default(), &|_| {}).unwrap();
    let run = LoadedRun::open(&out).unwrap();
    assert_eq!(run.manifest.solver, "x0-renoise");
    assert!(run.manifest.method.contains("x0-renoise"), "{}", run.manifest.method);
    let (n, seed) = (200, 7);
    let got = run.sample(n, None, seed, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // The rule by hand.
    let mut rng = Rng::new(seed);
    let mut x = dmd::noise(&mut rng, n, &[2]).unwrap();
    let cond = class_cond(run.mixture.sample_classes(n, &mut rng)).unwrap();
    let sig = &run.manifest.sigmas;
    for i in 0..sig.len() - 1 {
        let v = run.experts[0].velocity(&x, &Tensor::full(sig[i] as f32, n, x.device()).unwrap(), &cond).unwrap();
        let x0 = (&x - (v * sig[i]).unwrap()).unwrap();
        x = if sig[i + 1] > 0.0 {
            let eps = dmd::noise(&mut rng, n, &[2]).unwrap();
            ((x0 * (1.0 - sig[i + 1])).unwrap() + (eps * sig[i + 1]).unwrap()).unwrap()
        } else {
            x0
        };
    }
    assert!(got == x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "sample --run does not follow x0-renoise");
    // Not Euler: the same experts stepped by Euler give other samples.
    let mut as_euler = LoadedRun::open(&out).unwrap();
    as_euler.manifest.solver = "euler".into();
    assert!(as_euler.sample(n, None, seed, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap() != got);
    // The assembled checkpoint carries the solver and samples the same bits.
    let moe = d.path().join("dmd2.safetensors");
    phasekit::moe::assemble::assemble_run(&out, &moe, false).unwrap();
    let lm = LoadedMoe::open(&moe).unwrap();
    assert_eq!(lm.routing.solver, "x0-renoise");
    assert!(lm.sample(n, None, seed, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap() == got);
    // An unknown solver is refused, not sampled by Euler.
    as_euler.manifest.solver = "heun".into();
    assert_eq!(as_euler.sample(n, None, seed, None).unwrap_err().kind(), Kind::Unsupported);
    // Transformer recipes roll out with Euler only.
    let e = Recipe::parse("model = \"qwen-image\"\n[schedule]\nrollout = \"x0-renoise\"\n", Path::new("x.toml")).unwrap_err();
    assert!(e.to_string().contains("toy only"), "{e}");
}

/// Regression (issue 15, defect 4): σ values, timesteps and routing boundaries survive the JSON
/// of run manifests and MoE metadata bit for bit (serde_json's default float parser was 1 ulp off
/// for some: 5 steps at shift 5 gave σ₁ = 0.9523809523809523 → …24, and `sample --moe` then routed
/// step 1 to the next expert).
#[test]
fn sigmas_timesteps_and_ranges_round_trip_through_json_bit_for_bit() {
    use phasekit::train::schedule::{sigmas, Schedule};
    let mut checked = 0;
    for steps in 1..=16 {
        for shift in [1.0, 3.0, 5.0, 7.5, 12.3] {
            let s = Schedule::new(steps, shift, &[]).unwrap();
            let ranges: Vec<[f64; 2]> = s.expert_ranges(None, &|_| 0).iter().map(|(a, b)| [*a, *b]).collect();
            let ts: Vec<f64> = sigmas(steps, shift).iter().map(|x| x * 1000.0).collect();
            let text = serde_json::to_string(&(&s.sigmas, &ts, &ranges)).unwrap();
            let back: (Vec<f64>, Vec<f64>, Vec<[f64; 2]>) = serde_json::from_str(&text).unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.0), bits(&s.sigmas), "{steps} steps, shift {shift}");
            assert_eq!(bits(&back.1), bits(&ts));
            assert_eq!(bits(&back.2.concat()), bits(&ranges.concat()));
            checked += 1;
        }
    }
    assert_eq!(checked, 80);
    let s = sigmas(5, 5.0);
    assert_eq!(serde_json::from_str::<f64>(&serde_json::to_string(&s[1]).unwrap()).unwrap().to_bits(), s[1].to_bits());
}

/// The same through a real run, its assembled checkpoint and `sample --moe`'s routing: every
/// step of several grids goes to the same expert from the run folder and from the checkpoint.
#[test]
fn a_checkpoint_routes_every_step_as_its_run_does() {
    setup();
    let d = tempfile::tempdir().unwrap();
    let mut r = tiny(&[1, 3, 5], 1);
    r.schedule.steps = 5;
    r.schedule.shift = 5.0;
    let out = d.path().join("run");
    phasekit::train::train(&r, &r.to_toml(), &out, &TrainOptions::default(), &|_| {}).unwrap();
    let moe = d.path().join("moe.safetensors");
    let bin = env!("CARGO_BIN_EXE_phasekit");
    let o = std::process::Command::new(bin).args(["assemble", "--run"]).arg(&out).arg("-o").arg(&moe).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = LoadedRun::open(&out).unwrap();
    let ck = phasekit::train::toy::sample::LoadedMoe::open(&moe).unwrap();
    for steps in [None, Some(3), Some(5), Some(7), Some(8), Some(16)] {
        for sg in run.sigmas(steps) {
            assert_eq!(ck.route(sg), run.route(sg), "{steps:?} steps, σ {sg}");
        }
    }
    // The trained grid: step 1 (σ₁ = 0.952…) is phase 2's first step.
    assert_eq!(ck.route(run.sigmas(None)[1]), 1);
}
