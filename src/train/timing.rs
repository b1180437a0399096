//! Where the time of a Phased DMD update goes (`phasekit bench train`): an optional per-thread
//! accumulator of seconds per part (the generator's rollout, the teacher, the fake score, each
//! backward pass and optimiser step). Off unless [`start`] was called: then [`part`] is a plain
//! call. On, the device is synchronised before and after each part, so that an asynchronous
//! device (CUDA) charges its work to the part that queued it.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

type CResult<T> = candle_core::Result<T>;

struct Parts {
    device: Device,
    seconds: Vec<(&'static str, f64)>,
}

thread_local! {
    static PARTS: RefCell<Option<Parts>> = const { RefCell::new(None) };
}

/// Start timing the parts on this thread (`device`: the one to synchronise).
pub fn start(device: &Device) {
    PARTS.with_borrow_mut(|p| *p = Some(Parts { device: device.clone(), seconds: Vec::new() }));
}

/// Stop timing; the seconds per part, in the order the parts first ran.
pub fn finish() -> Vec<(&'static str, f64)> {
    PARTS.with_borrow_mut(|p| p.take().map(|p| p.seconds).unwrap_or_default())
}

/// Run `f` as part `name` (timed when [`start`] is in effect).
pub fn part<T>(name: &'static str, f: impl FnOnce() -> CResult<T>) -> CResult<T> {
    let device = PARTS.with_borrow(|p| p.as_ref().map(|p| p.device.clone()));
    let Some(device) = device else { return f() };
    device.synchronize()?;
    let t0 = Instant::now();
    let r = f()?;
    device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    PARTS.with_borrow_mut(|p| {
        if let Some(p) = p.as_mut() {
            match p.seconds.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => *s += dt,
                None => p.seconds.push((name, dt)),
            }
        }
    });
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_only_while_started() {
        assert_eq!(part("x", || Ok(1)).unwrap(), 1);
        assert!(finish().is_empty(), "not started: nothing recorded");
        start(&Device::Cpu);
        for _ in 0..2 {
            part("a", || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                Ok(())
            })
            .unwrap();
        }
        part("b", || Ok(())).unwrap();
        let p = finish();
        assert_eq!(p.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["a", "b"]);
        assert!(p[0].1 >= 0.04 && p[1].1 < p[0].1, "{p:?}");
        assert!(finish().is_empty());
        // An error inside a part is returned as it is.
        assert!(part::<()>("c", || candle_core::bail!("boom")).is_err());
    }
}
