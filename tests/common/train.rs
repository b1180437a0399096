//! Helpers of the training tests: single-threaded kernels (bit-stable results) and the shipped
//! recipes.

use std::path::PathBuf;

use phasekit::train::recipe::Recipe;

/// Kernels on one thread, once per test binary, so that results are the same bits every run.
pub fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(phasekit::train::single_threaded_kernels);
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A shipped recipe (`recipes/NAME`) and its text.
pub fn recipe(name: &str) -> (Recipe, String) {
    Recipe::load(&repo().join("recipes").join(name)).unwrap()
}
