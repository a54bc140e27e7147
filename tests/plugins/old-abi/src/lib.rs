//! Stands in for a plugin built against an older rmlx-plugin-api: it exports
//! the two plain symbols the host reads first, with ABI version 0.
use std::ffi::c_char;

#[no_mangle]
pub extern "C" fn rmlx_plugin_abi_version() -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn rmlx_plugin_id() -> *const c_char {
    c"old-plugin".as_ptr()
}
