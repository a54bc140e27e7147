//! An owned mlx-c array handle: the only way tensors cross the boundary.
//!
//! Host and plugins link the same `libmlxc.so`, so a handle made in one image
//! is valid in every other; dropping it anywhere calls `mlx_array_free`.
use abi_stable::StableAbi;
use mlx_rs::Array;
use std::ffi::c_void;

#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct MlxArray {
    ctx: *mut c_void,
}

// MLX arrays are reference-counted handles to immutable graph nodes; moving
// the handle between threads is what mlx-rs does too.
unsafe impl Send for MlxArray {}
unsafe impl Sync for MlxArray {}

impl MlxArray {
    /// Takes ownership of an mlx-rs array.
    pub fn from_array(array: Array) -> Self {
        let raw = array.as_ptr();
        std::mem::forget(array);
        Self { ctx: raw.ctx }
    }

    /// A new handle to the same array (MLX reference counting).
    pub fn from_ref(array: &Array) -> Self {
        Self::from_array(array.clone())
    }

    /// Gives ownership back to mlx-rs.
    pub fn into_array(self) -> Array {
        let raw = mlx_sys::mlx_array { ctx: self.ctx };
        std::mem::forget(self);
        unsafe { Array::from_ptr(raw) }
    }

    /// A new mlx-rs handle to the same array, leaving this one in place.
    pub fn to_array(&self) -> Array {
        unsafe {
            let mut out = mlx_sys::mlx_array_new();
            mlx_sys::mlx_array_set(&mut out, mlx_sys::mlx_array { ctx: self.ctx });
            Array::from_ptr(out)
        }
    }
}

impl Clone for MlxArray {
    fn clone(&self) -> Self {
        Self::from_array(self.to_array())
    }
}

impl Drop for MlxArray {
    fn drop(&mut self) {
        if !self.ctx.is_null() {
            unsafe { mlx_sys::mlx_array_free(mlx_sys::mlx_array { ctx: self.ctx }) };
        }
    }
}

impl From<Array> for MlxArray {
    fn from(a: Array) -> Self {
        Self::from_array(a)
    }
}
