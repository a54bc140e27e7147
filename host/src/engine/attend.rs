//! The host's KV stores lent to an architecture's forward as the plugin
//! API's `Attention`: one set of `extern "C"` callbacks for every store
//! (the one-sequence `KvCache`, the paged `PagedForward`, the compiled
//! step's traced buffers).
use mlx_rs::Array;
use rmlx_plugin_api::{author::guard, AttendOptions, Attention, MlxArray, PResult, PluginError};
use std::ffi::c_void;

pub trait KvStore {
    /// B, the rows of the forward.
    fn batch(&self) -> u32;
    /// Row 0's tokens already cached (for shape decisions; 0 while tracing).
    fn offset(&self) -> i32;
    /// int32 [B]: each row's tokens already cached.
    fn offsets(&self) -> Array;
    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: AttendOptions) -> Result<Array, PluginError>;
}

/// Lends `store` to one forward call (it must outlive the `Attention`).
pub fn lend<T: KvStore>(store: &mut T) -> Attention {
    unsafe { Attention::new(store as *mut T as *mut c_void, offset_cb::<T>, attend_cb::<T>, offsets_cb::<T>, batch_cb::<T>) }
}

extern "C" fn offset_cb<T: KvStore>(state: *mut c_void) -> i32 {
    unsafe { &*(state as *const T) }.offset()
}

extern "C" fn offsets_cb<T: KvStore>(state: *mut c_void) -> MlxArray {
    MlxArray::from_array(unsafe { &*(state as *const T) }.offsets())
}

extern "C" fn batch_cb<T: KvStore>(state: *mut c_void) -> u32 {
    unsafe { &*(state as *const T) }.batch()
}

extern "C" fn attend_cb<T: KvStore>(
    state: *mut c_void,
    layer: u32,
    q: MlxArray,
    k: MlxArray,
    v: MlxArray,
    opts: AttendOptions,
) -> PResult<MlxArray> {
    let store = unsafe { &mut *(state as *mut T) };
    guard(|| store.attend(layer, q.into_array(), k.into_array(), v.into_array(), opts).map(MlxArray::from_array))
}
