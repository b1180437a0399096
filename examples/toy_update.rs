//! Wall time per generator update of the toy trainer (bench settings: exact teacher, TTUR 5,
//! batch 256, MLP 64×3), one thread: `cargo run --release --example toy_update -- [METHOD] [UPDATES]`
//! (METHOD: a `bench train-toy` key, default `phased4`; UPDATES: default 200; an optional third
//! argument overrides the teacher's pretraining steps). The timing code is
//! `phasekit::train::speed`, which `phasekit bench toy-step` also runs.

fn main() {
    phasekit::train::single_threaded_kernels();
    let args: Vec<String> = std::env::args().collect();
    let key = args.get(1).map_or("phased4", |s| s.as_str());
    let updates: u64 = args.get(2).map_or(200, |s| s.parse().expect("UPDATES is a number"));
    let steps = args.get(3).map(|s| s.parse().expect("PRETRAIN_STEPS is a number"));
    let t = phasekit::train::speed::time_updates(key, updates, steps).unwrap();
    println!(
        "{key}: teacher pretraining {} steps {:.2} s ({:.2} ms/step); {} generator updates {:.2} s ({:.2} ms/update, median {:.2} ms after 10)",
        t.pretrain_steps,
        t.pretrain_seconds,
        1e3 * t.pretrain_seconds / t.pretrain_steps.max(1) as f64,
        t.updates,
        t.train_seconds,
        1e3 * t.train_seconds / t.updates.max(1) as f64,
        t.median_ms(10)
    );
}
