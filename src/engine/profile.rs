//! Time by kind of kernel (`termtune bench --profile`): while on, [`span`] waits for the device before and after
//! what it wraps and adds the time to its kind (norm, linear, attention, …). The waits serialise the GPU's queue,
//! so a profiled step is slower than a real one; the shares show where a step's time goes. Off (the default),
//! a span is one thread-local flag read. Per thread: the step's forward, its backward (candle runs custom ops'
//! backward on the calling thread) and the profile belong to the thread that runs the step.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static TIMES: RefCell<BTreeMap<&'static str, (f64, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Turns timing on or off on this thread (and clears what was recorded when turning it on).
pub fn enable(on: bool) {
    if on {
        take();
    }
    ON.set(on);
}

/// Runs `f`; while profiling, its time on `device` counts towards `kind`.
pub fn span<T>(kind: &'static str, device: &Device, f: impl FnOnce() -> T) -> T {
    if !ON.get() {
        return f();
    }
    let _ = device.synchronize();
    let t0 = Instant::now();
    let out = f();
    let _ = device.synchronize();
    let dt = t0.elapsed().as_secs_f64();
    TIMES.with_borrow_mut(|m| {
        let e = m.entry(kind).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    });
    out
}

/// What was recorded since the last call, by kind: (kind, seconds, calls), longest first.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let m = TIMES.with_borrow_mut(std::mem::take);
    let mut v: Vec<_> = m.into_iter().map(|(k, (s, n))| (k, s, n)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// [`take`] as lines `kind  seconds  share  calls` against a step of `total` seconds (the rest is "other").
pub fn report(total: f64) -> String {
    use std::fmt::Write as _;
    let spans = take();
    let timed: f64 = spans.iter().map(|s| s.1).sum();
    let mut out = String::new();
    let pct = |s: f64| 100.0 * s / total.max(1e-12);
    for (kind, s, n) in &spans {
        let _ = writeln!(
            out,
            "  {kind:<26}{s:>9.4} s {:>6.1} % {n:>7} calls",
            pct(*s)
        );
    }
    let rest = (total - timed).max(0.0);
    let _ = writeln!(
        out,
        "  {:<26}{rest:>9.4} s {:>6.1} %  (outside the timed kernels: embedding, masks, gathers, launches)",
        "other",
        pct(rest)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_only_while_on_and_report_sums_to_the_step() {
        enable(false);
        span("linear", &Device::Cpu, || {
            std::thread::sleep(std::time::Duration::from_millis(5))
        });
        assert!(take().is_empty(), "nothing is recorded while off");
        enable(true);
        for _ in 0..3 {
            span("linear", &Device::Cpu, || {
                std::thread::sleep(std::time::Duration::from_millis(5))
            });
        }
        span("attention", &Device::Cpu, || {
            std::thread::sleep(std::time::Duration::from_millis(20))
        });
        enable(false);
        let got = take();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "attention", "longest first: {got:?}");
        assert_eq!(got[1].2, 3);
        assert!(got[1].1 >= 0.015, "{got:?}");
        enable(true);
        span("norm", &Device::Cpu, || {
            std::thread::sleep(std::time::Duration::from_millis(10))
        });
        enable(false);
        let r = report(0.04);
        assert!(r.contains("norm"), "{r}");
        assert!(r.contains("other"), "{r}");
    }
}
