//! The mlx-c custom-kernel calls behind a small safe surface: a kernel made
//! once per process, applied with its launch (grid in threads, as MLX takes
//! it; template constants; one output, or several with `apply_outputs`).
use mlx_rs::{Array, Dtype};
use mlx_sys as sys;
use std::ffi::{c_char, CString};

/// Which GPU backend the default device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cuda,
    Metal,
    /// The default device is the CPU (or no GPU backend is available).
    None,
}

pub fn backend() -> Backend {
    unsafe {
        let mut dev = sys::mlx_device_new();
        let mut ty: sys::mlx_device_type = sys::mlx_device_type__MLX_CPU;
        let ok = sys::mlx_get_default_device(&mut dev) == 0 && sys::mlx_device_get_type(&mut ty, dev) == 0;
        sys::mlx_device_free(dev);
        if !ok || ty != sys::mlx_device_type__MLX_GPU {
            return Backend::None;
        }
        let mut yes = false;
        if sys::mlx_cuda_is_available(&mut yes) == 0 && yes {
            return Backend::Cuda;
        }
        yes = false;
        if sys::mlx_metal_is_available(&mut yes) == 0 && yes {
            return Backend::Metal;
        }
        Backend::None
    }
}

/// One launch of a kernel.
pub struct Launch<'a> {
    /// Threads in x, y, z (MLX divides by `threads` for the blocks).
    pub grid: (i32, i32, i32),
    pub threads: (i32, i32, i32),
    pub out_shape: Vec<i32>,
    pub out_dtype: Dtype,
    pub ints: &'a [(&'a str, i32)],
    pub bools: &'a [(&'a str, bool)],
}

enum Raw {
    Cuda(sys::mlx_fast_cuda_kernel),
    Metal(sys::mlx_fast_metal_kernel),
}

/// A compiled-on-demand custom kernel (MLX caches each template variant).
pub struct Kernel(Raw);

// The kernel object is immutable after creation; MLX guards its own caches.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("kernel strings hold no NUL")
}

fn names(list: &[&str]) -> sys::mlx_vector_string {
    unsafe {
        let v = sys::mlx_vector_string_new();
        for n in list {
            let c = cstr(n);
            sys::mlx_vector_string_append_value(v, c.as_ptr());
        }
        v
    }
}

impl Kernel {
    pub fn cuda(name: &str, inputs: &[&str], output: &str, source: &str, header: &str) -> Self {
        Self::cuda_outputs(name, inputs, &[output], source, header)
    }

    /// As [`Kernel::cuda`], with several outputs (see [`Kernel::apply_outputs`]).
    pub fn cuda_outputs(name: &str, inputs: &[&str], outputs: &[&str], source: &str, header: &str) -> Self {
        let (n, s, hdr) = (cstr(name), cstr(source), cstr(header));
        unsafe {
            let (i, o) = (names(inputs), names(outputs));
            let k = sys::mlx_fast_cuda_kernel_new(n.as_ptr(), i, o, s.as_ptr(), hdr.as_ptr(), true, 0);
            sys::mlx_vector_string_free(i);
            sys::mlx_vector_string_free(o);
            Kernel(Raw::Cuda(k))
        }
    }

    pub fn metal(name: &str, inputs: &[&str], output: &str, source: &str, header: &str) -> Self {
        Self::metal_outputs(name, inputs, &[output], source, header)
    }

    /// As [`Kernel::metal`], with several outputs (see [`Kernel::apply_outputs`]).
    pub fn metal_outputs(name: &str, inputs: &[&str], outputs: &[&str], source: &str, header: &str) -> Self {
        let (n, s, hdr) = (cstr(name), cstr(source), cstr(header));
        unsafe {
            let (i, o) = (names(inputs), names(outputs));
            let k = sys::mlx_fast_metal_kernel_new(n.as_ptr(), i, o, s.as_ptr(), hdr.as_ptr(), true, false);
            sys::mlx_vector_string_free(i);
            sys::mlx_vector_string_free(o);
            Kernel(Raw::Metal(k))
        }
    }

    /// Runs the kernel lazily (its output is a graph node like any op's).
    pub fn apply(&self, inputs: &[Array], l: &Launch) -> Result<Array, String> {
        let mut outs = self.apply_outputs(inputs, l, &[])?;
        Ok(outs.remove(0))
    }

    /// As [`Kernel::apply`] for a kernel of several outputs: the first is
    /// `l.out_shape`/`l.out_dtype`, then one per entry of `more`.
    pub fn apply_outputs(&self, inputs: &[Array], l: &Launch, more: &[(&[i32], Dtype)]) -> Result<Vec<Array>, String> {
        let mut shapes: Vec<(&[i32], Dtype)> = vec![(&l.out_shape, l.out_dtype)];
        shapes.extend_from_slice(more);
        unsafe {
            let ins = sys::mlx_vector_array_new();
            for a in inputs {
                sys::mlx_vector_array_append_value(ins, a.as_ptr());
            }
            let mut outs = sys::mlx_vector_array_new();
            let stream = sys::mlx_default_gpu_stream_new();
            let keep: Vec<CString> = l.ints.iter().map(|(n, _)| cstr(n)).chain(l.bools.iter().map(|(n, _)| cstr(n))).collect();
            let rc = match &self.0 {
                Raw::Cuda(k) => {
                    let cfg = sys::mlx_fast_cuda_kernel_config_new();
                    for (shape, dt) in &shapes {
                        sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, shape.as_ptr(), shape.len(), *dt as sys::mlx_dtype);
                    }
                    sys::mlx_fast_cuda_kernel_config_set_grid(cfg, l.grid.0, l.grid.1, l.grid.2);
                    sys::mlx_fast_cuda_kernel_config_set_thread_group(cfg, l.threads.0, l.threads.1, l.threads.2);
                    for (i, (_, v)) in l.ints.iter().enumerate() {
                        sys::mlx_fast_cuda_kernel_config_add_template_arg_int(cfg, keep[i].as_ptr() as *const c_char, *v);
                    }
                    for (j, (_, v)) in l.bools.iter().enumerate() {
                        sys::mlx_fast_cuda_kernel_config_add_template_arg_bool(cfg, keep[l.ints.len() + j].as_ptr(), *v);
                    }
                    let rc = sys::mlx_fast_cuda_kernel_apply(&mut outs, *k, ins, cfg, stream);
                    sys::mlx_fast_cuda_kernel_config_free(cfg);
                    rc
                }
                Raw::Metal(k) => {
                    let cfg = sys::mlx_fast_metal_kernel_config_new();
                    for (shape, dt) in &shapes {
                        sys::mlx_fast_metal_kernel_config_add_output_arg(cfg, shape.as_ptr(), shape.len(), *dt as sys::mlx_dtype);
                    }
                    sys::mlx_fast_metal_kernel_config_set_grid(cfg, l.grid.0, l.grid.1, l.grid.2);
                    sys::mlx_fast_metal_kernel_config_set_thread_group(cfg, l.threads.0, l.threads.1, l.threads.2);
                    for (i, (_, v)) in l.ints.iter().enumerate() {
                        sys::mlx_fast_metal_kernel_config_add_template_arg_int(cfg, keep[i].as_ptr(), *v);
                    }
                    for (j, (_, v)) in l.bools.iter().enumerate() {
                        sys::mlx_fast_metal_kernel_config_add_template_arg_bool(cfg, keep[l.ints.len() + j].as_ptr(), *v);
                    }
                    let rc = sys::mlx_fast_metal_kernel_apply(&mut outs, *k, ins, cfg, stream);
                    sys::mlx_fast_metal_kernel_config_free(cfg);
                    rc
                }
            };
            sys::mlx_stream_free(stream);
            sys::mlx_vector_array_free(ins);
            if rc != 0 || sys::mlx_vector_array_size(outs) != shapes.len() {
                sys::mlx_vector_array_free(outs);
                return Err("MLX refused the custom kernel launch".into());
            }
            let mut res = Vec::with_capacity(shapes.len());
            for i in 0..shapes.len() {
                let mut out = sys::mlx_array_new();
                sys::mlx_vector_array_get(&mut out, outs, i);
                res.push(Array::from_ptr(out));
            }
            sys::mlx_vector_array_free(outs);
            Ok(res)
        }
    }
}
