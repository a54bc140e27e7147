//! Element-wise functions compiled once per thread and reused, so that MLX
//! fuses each into one kernel without tracing it again on every call.
//!
//! mlx-rs's `compile(f, ..)` takes a fresh function id each time it is
//! called (and erases it when dropped), so a function that calls `compile`
//! per use (mlx-rs's own `nn::silu` included) traces and fuses its graph on
//! every call: host work on every layer of every decode step. mlx-lm's
//! `@mx.compile` keeps one traced function; these do the same. Each thread
//! keeps its own, leaked on purpose: nothing is erased from MLX's compile
//! cache at thread or process exit (docs/decisions.md).
use mlx_rs::{error::Exception, nn, transforms::compile::compile, Array};
use std::cell::RefCell;

type Fn1 = Box<dyn for<'a> FnMut(&'a Array) -> Result<Array, Exception>>;
type Fn2 = Box<dyn for<'a> FnMut((&'a Array, &'a Array)) -> Result<Array, Exception>>;

thread_local! {
    static SILU: &'static RefCell<Fn1> = Box::leak(Box::new(RefCell::new(Box::new(compile(
        |x: &Array| x.multiply(nn::sigmoid(x)?),
        true,
    )) as Fn1)));
    static SWIGLU: &'static RefCell<Fn2> = Box::leak(Box::new(RefCell::new(Box::new(compile(
        |(g, u): (&Array, &Array)| g.multiply(nn::sigmoid(g)?)?.multiply(u),
        true,
    )) as Fn2)));
}

/// silu(x) = x * sigmoid(x), one fused kernel (mlx-rs's `nn::silu`, traced once).
pub fn silu(x: &Array) -> Result<Array, Exception> {
    SILU.with(|f| match f.try_borrow_mut() {
        Ok(mut f) => f(x),
        Err(_) => x.multiply(nn::sigmoid(x)?), // re-entered while tracing: the same ops, unfused
    })
}

/// silu(gate) * up, one fused kernel (mlx-lm's compiled `swiglu`).
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array, Exception> {
    SWIGLU.with(|f| match f.try_borrow_mut() {
        Ok(mut f) => f((gate, up)),
        Err(_) => gate.multiply(nn::sigmoid(gate)?)?.multiply(up),
    })
}
