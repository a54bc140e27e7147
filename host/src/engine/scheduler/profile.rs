//! `RMLX_STEP_PROFILE=1`: one stderr line per engine step of a lane, with
//! where its wall time went, to see what dominates a server run (TTFT,
//! many streams) on a machine where only whole runs can be timed:
//!
//! `step 12 lane=m/bf16 rows=8 prefill=2/1024 prefill_ms=31.2 build_ms=1.9 dispatch_ms=2.0 wait_ms=4.1 total_ms=37.6`
//!
//! - `prefill`: forwards / prompt tokens this step, and their time (each
//!   prefill forward is evaluated inside the step);
//! - `build_ms`: building the batched decode forward's graph (host work; on
//!   a GPU the device runs the previous step meanwhile, when pipelined);
//! - `dispatch_ms`: `async_eval` of a pipelined step (MLX encodes and
//!   launches its kernels on the calling thread);
//! - `wait_ms`: reading the previous step's tokens (the host waiting for the
//!   device), or this step's when it is not pipelined;
//! - `total_ms`: the whole step, bookkeeping included.
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Whether steps are profiled (read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_STEP_PROFILE").is_ok_and(|v| v != "0"))
}

/// One step's phases, filled while it runs.
#[derive(Default)]
struct StepProfile {
    prefill: Duration,
    prefill_forwards: u64,
    prefill_tokens: u64,
    build: Duration,
    dispatch: Duration,
    wait: Duration,
    rows: usize,
}

/// The phases a step's time is split into.
#[derive(Clone, Copy)]
pub enum Phase {
    Prefill,
    Build,
    Dispatch,
    Wait,
}

thread_local! {
    /// The engine thread's step in progress (only while profiling).
    static CURRENT: RefCell<Option<(Instant, StepProfile)>> = const { RefCell::new(None) };
}

/// Starts a step's profile.
pub fn begin() {
    if enabled() {
        CURRENT.with(|c| *c.borrow_mut() = Some((Instant::now(), StepProfile::default())));
    }
}

/// Runs `f`, adding its time to `phase` of the step in progress.
pub fn time<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let d = t.elapsed();
    CURRENT.with(|c| {
        if let Some((_, p)) = c.borrow_mut().as_mut() {
            *match phase {
                Phase::Prefill => &mut p.prefill,
                Phase::Build => &mut p.build,
                Phase::Dispatch => &mut p.dispatch,
                Phase::Wait => &mut p.wait,
            } += d;
        }
    });
    r
}

/// Notes the step's prefill forwards and tokens, and its decode rows.
pub fn note(prefill_forwards: u64, prefill_tokens: u64, rows: usize) {
    if enabled() {
        CURRENT.with(|c| {
            if let Some((_, p)) = c.borrow_mut().as_mut() {
                p.prefill_forwards += prefill_forwards;
                p.prefill_tokens += prefill_tokens;
                p.rows = p.rows.max(rows);
            }
        });
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Ends the step in progress and prints its line.
pub fn end(step: u64, lane: &super::LaneId) {
    if !enabled() {
        return;
    }
    let Some((t0, p)) = CURRENT.with(|c| c.borrow_mut().take()) else { return };
    eprintln!(
        "step {step} lane={}/{} rows={} prefill={}/{} prefill_ms={:.2} build_ms={:.2} dispatch_ms={:.2} wait_ms={:.2} total_ms={:.2}",
        lane.model,
        lane.family,
        p.rows,
        p.prefill_forwards,
        p.prefill_tokens,
        ms(p.prefill),
        ms(p.build),
        ms(p.dispatch),
        ms(p.wait),
        ms(t0.elapsed())
    );
}
