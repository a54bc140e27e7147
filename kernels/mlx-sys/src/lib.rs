//! Bindings to the shared mlx-c (`libmlxc.so`) that every image in an rmlx
//! process links: the host binary and each plugin cdylib share one MLX.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

extern "C" {
    #[link_name = "mlx_set_error_handler"]
    fn mlx_set_error_handler_raw(
        handler: mlx_error_handler_func,
        data: *mut ::std::os::raw::c_void,
        dtor: ::std::option::Option<unsafe extern "C" fn(arg1: *mut ::std::os::raw::c_void)>,
    );
}

#[cfg(rmlx_error_bus)]
/// Subscribes `handler` to the process's error bus (kept in libmlxc) instead of
/// replacing the one global handler. Each image's mlx-rs subscribes its own
/// thread-local error slot, so an error raised by a call from any image reaches
/// that image with MLX's message. `dtor` is never called: subscriptions live
/// as long as the process (plugins are never unloaded).
pub unsafe fn mlx_set_error_handler(
    handler: mlx_error_handler_func,
    data: *mut ::std::os::raw::c_void,
    _dtor: ::std::option::Option<unsafe extern "C" fn(arg1: *mut ::std::os::raw::c_void)>,
) {
    if let Some(f) = handler {
        rmlx_error_bus_subscribe(Some(f), data);
    }
}

#[cfg(not(rmlx_error_bus))]
/// Without the error bus (an mlx-c not built by `make mlx`), the last image to
/// register wins, as in upstream mlx-c.
pub unsafe fn mlx_set_error_handler(
    handler: mlx_error_handler_func,
    data: *mut ::std::os::raw::c_void,
    dtor: ::std::option::Option<unsafe extern "C" fn(arg1: *mut ::std::os::raw::c_void)>,
) {
    mlx_set_error_handler_raw(handler, data, dtor)
}

/// The raw mlx-c call, for the host alone (it owns global MLX state).
pub unsafe fn mlx_set_error_handler_global(
    handler: mlx_error_handler_func,
    data: *mut ::std::os::raw::c_void,
) {
    mlx_set_error_handler_raw(handler, data, None)
}

/// mlx-rs seeds `RandomState::new` from Darwin's `mach_approximate_time`, which
/// does not exist elsewhere. rmlx samples in the host with its own RNG; this
/// gives the symbol a monotonic-clock meaning off macOS so mlx-rs links.
#[cfg(not(target_os = "macos"))]
#[no_mangle]
pub extern "C" fn mach_approximate_time() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
