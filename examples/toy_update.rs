//! Wall time per generator update of the toy trainer (bench settings: exact teacher, TTUR 5,
//! batch 256, MLP 64×3), one thread: `cargo run --release --example toy_update -- [METHOD] [UPDATES]`
//! (METHOD: a `bench train-toy` key, default `phased4`; UPDATES: default 200; an optional third
//! argument overrides the teacher's pretraining steps).
use std::path::Path;
use std::time::Instant;

use phasekit::train::experiments::{methods, recipe_for};
use phasekit::train::mixture::Mixture;
use phasekit::train::run::{self, TrainOptions};

fn main() {
    phasekit::train::single_threaded_kernels();
    let args: Vec<String> = std::env::args().collect();
    let key = args.get(1).map_or("phased4", |s| s.as_str());
    let updates: u64 = args.get(2).map_or(200, |s| s.parse().expect("UPDATES is a number"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let m = methods().into_iter().find(|m| m.key == key).expect("a bench train-toy method key");
    let mut base = phasekit::train::recipe::Recipe::parse(m.base, Path::new(key)).unwrap();
    if let Some(steps) = args.get(3) {
        base.teacher.pretrain.steps = steps.parse().expect("PRETRAIN_STEPS is a number");
    }
    let mix = Mixture::new(&base.mixture).unwrap();
    let t = Instant::now();
    let teacher = run::pretrain_teacher(&base, &mix, &|_, _, _| {}).unwrap();
    let pre = t.elapsed().as_secs_f64();
    let teacher_file = dir.join("teacher.safetensors");
    run::write_tensors(&teacher_file, &teacher.named_tensors(), &[]).unwrap();
    let r = recipe_for(&m, 0, updates, &teacher_file).unwrap();
    let t = Instant::now();
    let s = run::train(&r, &r.to_toml(), &dir.join("run"), &TrainOptions::default(), &|_| {}).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{key}: teacher pretraining {} steps {pre:.2} s ({:.2} ms/step); {} generator updates {secs:.2} s ({:.2} ms/update)",
        base.teacher.pretrain.steps,
        1e3 * pre / base.teacher.pretrain.steps as f64,
        s.global_step,
        1e3 * secs / s.global_step as f64
    );
}
