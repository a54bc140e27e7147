//! `PagedForward`: the KV pool lent to one batched forward as the plugin
//! API's `Attention`. One attention call per layer for the whole batch: the
//! new tokens' k/v are encoded by the families' codecs and scattered into
//! their slots (in place: the pool arrays are only referenced by the
//! scatter), then the family attends over the pools read through the rows'
//! block tables (rows padded to the longest; padding reads block 0 and is
//! masked) with a mask that is causal per row, stops at each row's length,
//! and applies the layer's sliding window when it has one. Rows may bring
//! different numbers of new tokens (`PagedForward::ragged`, the scheduler's
//! batched prefill): they are left-padded, and padding is neither stored
//! nor seen. Keys and values of
//! one family: that family's `attend` (the dense family: MLX's fused sdpa).
//! Of two: the composed path (`scores`, softmax, `mix`).
//!
//! Layers have their own shapes (kv_layout.rs: per-layer K/V heads and head
//! size); a SHARED layer writes nothing and attends, with its own queries
//! and window, over its source layer's blocks, which the source wrote
//! earlier in the same forward.
//!
//! A pool split in layer groups (kv_groups.rs): full layers read every
//! block through the tables (entries flagged `DEAD` read as their block),
//! window layers write and read their own window blocks, gathering only
//! the span their queries' window reaches (paged_window.rs).
use super::kv_groups;
use super::kv_layout::{LayerLayout, SideShape};
use super::paged_window::WinTables;
use super::kv_pool::KvPool;
use super::recurrent::{self, RowState};
use mlx_rs::{ops::indexing::scatter_single, Array};
use rmlx_plugin_api::{
    author::kv::{composed_attend, AttendOpts, LayerDims, Paged},
    PluginError,
};
use std::collections::HashMap;
use std::ops::Range;

/// One row of a paged forward: its block table and the tokens already in it.
pub struct Row<'a> {
    pub table: &'a [u32],
    pub offset: usize,
}

/// The pool lent to one forward of `len` new tokens per row.
pub struct PagedForward<'a> {
    pool: &'a mut KvPool,
    offsets: Vec<i32>,
    len: usize,
    /// int32 [N]: the slots the new real tokens go to (row-major).
    write: Array,
    /// Ragged rows: int32 [N], the real tokens' indices in the forward's
    /// [B * len] (row-major); None when no row is padded (N = B * len).
    keep: Option<Array>,
    /// int32 [B, blocks]: per row, its table's first `blocks` entries, the
    /// blocks holding positions 0..ctx (padding: block 0). Gathering whole
    /// blocks takes one index per block, not one per token.
    tables: Array,
    /// Positions gathered per row: the longest row's blocks x block size.
    ctx: usize,
    /// Rows at the same positions (one row, or rows of one length at one
    /// offset): their common context length (the gather is cut to it).
    exact: Option<usize>,
    /// Per window (0: full attention): the mask, None when causal or none is enough.
    masks: HashMap<u32, Option<Array>>,
    /// Per row, its recurrent state (`with_states`); None: this forward
    /// keeps no state (a model with state layers is refused).
    states: Option<Vec<&'a RowState>>,
    /// Per state layer, what the model set: [B, ...] per component.
    new_states: HashMap<u32, Vec<Array>>,
    /// The rows' states already stacked (the last batch's, same rows).
    stacked: Option<HashMap<u32, Vec<Array>>>,
    /// Layers that stored this forward's tokens (what a SHARED layer reads).
    written: Vec<bool>,
    /// The window group's writes and tables, when the pool is split.
    win: Option<WinTables>,
    /// Per row, runs of positions that see each other both ways on top of
    /// the causal mask (`with_runs`); empty: plain causal.
    runs: Vec<Vec<Range<usize>>>,
    /// int32 [3, B, L]: multimodal-RoPE positions (`with_positions`).
    positions: Option<Array>,
}

impl<'a> PagedForward<'a> {
    /// Rows' tables must already cover `offset + len` tokens.
    pub fn new(pool: &'a mut KvPool, rows: &[Row], len: usize) -> anyhow::Result<Self> {
        Self::ragged(pool, rows, &vec![len; rows.len()])
    }

    /// Ragged rows (batched prefill): row b brings `lens[b]` new tokens,
    /// LEFT-padded to the longest, L = max(lens). Its first real token is
    /// at column L - lens[b], so every row's last real token is column
    /// L - 1 and `LOGITS_LAST` is each row's own. Its positions start at
    /// `offset - pad` (possibly negative: only padding sits there), so real
    /// tokens keep their true positions. Padding writes nothing (`keep`),
    /// real queries never see it (it is in no table), and padding queries
    /// see position 0 only (no all-masked softmax). Rows' tables must
    /// already cover `offset + lens[b]` tokens.
    pub fn ragged(pool: &'a mut KvPool, rows: &[Row], lens: &[usize]) -> anyhow::Result<Self> {
        anyhow::ensure!(lens.len() == rows.len(), "{} lengths for {} rows", lens.len(), rows.len());
        let len = lens.iter().copied().max().unwrap_or(0);
        let bs = pool.block_size;
        let nblk = rows.iter().zip(lens).map(|(r, &n)| (r.offset + n).div_ceil(bs)).max().unwrap_or(0);
        let ctx = nblk * bs;
        let slot = |t: &[u32], p: usize| (kv_groups::id(t[p / bs]) as usize * bs + p % bs) as i32;
        let mut write = Vec::with_capacity(rows.len() * len);
        let mut keep = Vec::new();
        let mut gather = Vec::with_capacity(rows.len() * nblk);
        let mut max_id = 0;
        for (b, (r, &n)) in rows.iter().zip(lens).enumerate() {
            let end = r.offset + n;
            if r.table.len() * bs < end {
                anyhow::bail!(
                    "a block table holds {} tokens, the forward needs {end}",
                    r.table.len() * bs
                );
            }
            max_id = max_id.max(r.table.iter().map(|&e| kv_groups::id(e)).max().unwrap_or(0) as usize);
            write.extend((r.offset..end).map(|p| slot(r.table, p)));
            keep.extend((b * len + len - n..(b + 1) * len).map(|i| i as i32));
            let own = end.div_ceil(bs);
            gather.extend(r.table[..own].iter().map(|&b| kv_groups::id(b) as i32));
            gather.extend(std::iter::repeat_n(0, nblk - own));
        }
        pool.reserve(max_id);
        let win = pool.win.as_ref().map(|g| WinTables::new(g, bs, rows, lens)).transpose()?;
        let b = rows.len() as i32;
        let padded = lens.iter().any(|&n| n != len);
        let offsets: Vec<i32> = rows.iter().zip(lens).map(|(r, &n)| r.offset as i32 - (len - n) as i32).collect();
        // Rows whose columns sit at the same positions (one row; prompts of
        // one length arriving together; streams decoding in step) all end
        // at offset + L: causal masking over exactly that many positions
        // is their mask, with no mask array (MLX's fused attention serves
        // it) and a gather cut to that length. The first row is the
        // longest's peer, so the common offset is >= 0.
        let same = offsets.windows(2).all(|w| w[0] == w[1]);
        let exact = offsets.first().filter(|&&o| same && o >= 0).map(|&o| o as usize + len);
        Ok(Self {
            pool,
            offsets,
            len,
            keep: padded.then(|| Array::from_slice(&keep, &[keep.len() as i32])),
            write: Array::from_slice(&write, &[write.len() as i32]),
            tables: Array::from_slice(&gather, &[b, nblk as i32]),
            ctx,
            exact,
            masks: HashMap::new(),
            states: None,
            new_states: HashMap::new(),
            stacked: None,
            written: Vec::new(),
            win,
            runs: Vec::new(),
            positions: None,
        })
    }

    /// The rows' multimodal-RoPE positions [3, B, L] (engine/mrope.rs),
    /// lent through `ForwardCtx::positions`; None leaves them to `offsets()`.
    pub fn with_positions(mut self, positions: Option<Array>) -> Self {
        self.positions = positions;
        self
    }

    /// Bidirectional runs per row (in the rows' order): absolute positions
    /// [a, b) whose tokens all see each other in every causal attention of
    /// this forward, on top of the causal (and windowed) mask: an image's
    /// placeholders where the model asks for it (`use_bidirectional_attention:
    /// "vision"`, media.rs). A run must end within its row's new tokens (keys
    /// past them hold no data yet); the part before them is in the cache.
    pub fn with_runs(mut self, runs: Vec<Vec<Range<usize>>>) -> anyhow::Result<Self> {
        anyhow::ensure!(runs.len() == self.offsets.len(), "{} rows of bidirectional runs for {} rows", runs.len(), self.offsets.len());
        for (b, row) in runs.iter().enumerate() {
            let end = (self.offsets[b] + self.len as i32).max(0) as usize;
            if let Some(r) = row.iter().find(|r| r.end > end || r.start >= r.end) {
                anyhow::bail!("a bidirectional run {}..{} of row {b} is empty or ends past its {end} tokens", r.start, r.end);
            }
        }
        self.masks.clear();
        self.runs = runs;
        Ok(self)
    }

    /// Lends the rows' recurrent states (one per row, in the rows' order)
    /// to the forward's state layers.
    pub fn with_states(mut self, states: Vec<&'a RowState>) -> Self {
        self.states = Some(states);
        self
    }

    /// The rows' states already stacked, per layer (`BatchState`): lent as
    /// they are instead of stacking `with_states`' rows.
    pub fn with_stacked(mut self, stacked: Option<HashMap<u32, Vec<Array>>>) -> Self {
        self.stacked = stacked;
        self
    }

    /// What the forward's state layers set, per layer [B, ...] per
    /// component (the caller splits it into rows once the forward succeeded).
    pub fn take_states(&mut self) -> HashMap<u32, Vec<Array>> {
        std::mem::take(&mut self.new_states)
    }

    /// bool [B, 1, len, ctx]: query i of row b (position offset_b + i) sees
    /// positions j <= offset_b + i, and j > offset_b + i - window when windowed,
    /// and every position of a bidirectional run it is in (`with_runs`).
    /// None where plain causal masking (or none) is exact: rows at the
    /// same positions (`exact`), no window, no runs.
    fn mask(&mut self, window: u32) -> Option<Array> {
        let (len, ctx) = (self.len, self.ctx);
        let (offsets, runs) = (&self.offsets, &self.runs);
        let plain = runs.iter().all(Vec::is_empty);
        let exact = self.exact.is_some();
        self.masks
            .entry(window)
            .or_insert_with(|| {
                if exact && window == 0 && plain {
                    return None; // the gather is cut to the rows' common length
                }
                let mut m = Vec::with_capacity(offsets.len() * len * ctx);
                for (b, &o) in offsets.iter().enumerate() {
                    let run = runs.get(b).map_or(&[][..], Vec::as_slice);
                    for i in 0..len {
                        // Negative: a ragged row's padding (it sees position 0 only).
                        let Ok(pos) = usize::try_from(o as isize + i as isize) else {
                            m.extend((0..ctx).map(|j| j == 0));
                            continue;
                        };
                        m.extend(
                            (0..ctx)
                                .map(|j| (j <= pos && (window == 0 || j + window as usize > pos)) || same_run(run, pos, j)),
                        );
                    }
                }
                Some(Array::from_slice(
                    &m,
                    &[offsets.len() as i32, 1, len as i32, ctx as i32],
                ))
            })
            .clone()
    }
}

impl super::attend::KvStore for PagedForward<'_> {
    fn batch(&self) -> u32 {
        self.offsets.len() as u32
    }

    fn offset(&self) -> i32 {
        self.offsets.first().copied().unwrap_or(0)
    }

    fn offsets(&self) -> Array {
        Array::from_slice(&self.offsets, &[self.offsets.len() as i32])
    }

    fn positions(&self) -> Option<Array> {
        self.positions.clone()
    }

    /// Layer `layer`'s state stacked over the rows ([B, ...] per component;
    /// zeros for a fresh row; empty when every row is fresh).
    fn state(&mut self, layer: u32) -> Result<Vec<Array>, PluginError> {
        if let Some(s) = self.new_states.get(&layer) {
            return Ok(s.clone());
        }
        if let Some(s) = self.stacked.as_ref().and_then(|m| m.get(&layer)) {
            return Ok(s.clone());
        }
        match &self.states {
            Some(rows) => recurrent::stack(rows, layer),
            None => Err(super::attend::no_state()),
        }
    }

    /// Keeps layer `layer`'s new state ([B, ...] per component) until the
    /// forward is done; the rows' own states change only then.
    fn set_state(&mut self, layer: u32, state: Vec<Array>) -> Result<(), PluginError> {
        if self.states.is_none() {
            return Err(super::attend::no_state());
        }
        let b = self.offsets.len() as i32;
        if let Some(bad) = state.iter().find(|a| a.ndim() == 0 || a.dim(0) != b) {
            return Err(PluginError::other(format!(
                "layer {layer} set a recurrent state of shape {:?} for {b} rows",
                bad.shape()
            )));
        }
        self.new_states.insert(layer, state);
        Ok(())
    }

    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(
        &mut self,
        layer: u32,
        q: Array,
        k: Array,
        v: Array,
        opts: &AttendOpts<'_>,
    ) -> Result<Array, PluginError> {
        super::attend::refuse_bidirectional(opts)?;
        let (b, n) = (self.offsets.len() as i32, self.len as i32);
        if q.ndim() != 4 || q.dim(0) != b || q.dim(2) != n {
            return Err(PluginError::other(format!("attention got q of shape {:?} for {b} rows of {n} tokens", q.shape())));
        }
        let (ks, vs) = match self.pool.layout(layer as usize) {
            Some(LayerLayout::Own { k, v }) => (k.clone(), v.clone()),
            Some(LayerLayout::Shared(src)) => return self.attend_shared(layer, *src, &q, opts),
            Some(LayerLayout::NoKv) => {
                return Err(PluginError::other(format!("layer {layer} keeps recurrent state; it has no K/V to attend over")))
            }
            None => return Err(PluginError::other(format!("attention layer {layer} out of range"))),
        };
        let (kd, vd) = (ks.dims, vs.dims);
        let fits = |x: &Array, d: &LayerDims| x.ndim() == 4 && x.dim(0) == b && x.dim(1) == d.kv_heads && x.dim(2) == n && x.dim(3) == d.head_dim;
        if !fits(&k, &kd) || !fits(&v, &vd) {
            return Err(PluginError::other(format!(
                "attention got k {:?} and v {:?}: they do not fit the KV pool's layer {layer} ({} kv heads of {} dims)",
                k.shape(),
                v.shape(),
                kd.kv_heads,
                kd.head_dim
            )));
        }
        // [B, K, L, hd] -> [B*L, K, hd] -> components [N, ...] -> [N, 1, ...]: one update per slot.
        let (kf, vf) = (&self.pool.k, &self.pool.v);
        let encode = |codec: &dyn rmlx_plugin_api::author::kv::KvCodecImpl, family: &str, shape: &SideShape, x: &Array| -> Result<Vec<Array>, PluginError> {
            // At L = 1 (decode) [B, K, 1, hd] is already [B, K, hd] in memory: no transpose.
            let x = if n == 1 { x.reshape(&[b, x.dim(1), x.dim(3)])? } else { x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b * n, x.dim(1), x.dim(3)])? };
            // Ragged rows: only the real tokens are stored. [B*L, K, hd] -> [N, K, hd]
            let x = match &self.keep {
                Some(keep) => x.take_axis(keep, 0)?,
                None => x,
            };
            encode_slots(codec, family, shape, &x)
        };
        let uk = encode(kf.codec_for(layer as usize), &kf.family, &ks, &k)?;
        let uv = encode(vf.codec_for(layer as usize), &vf.family, &vs, &v)?;
        // The layer stays in the pool until the new arrays replace it: an
        // error here (a k/v that does not fit the pool) leaves it as it was.
        let write = match &self.win {
            Some(w) if self.pool.in_window(layer as usize) => &w.write,
            _ => &self.write,
        };
        let (pk, pv) = self.pool.layer(layer as usize)?;
        let scatter = |pool: &[Array], upd: Vec<Array>| -> Result<Vec<Array>, PluginError> {
            pool.iter().zip(upd).map(|(p, u)| Ok(scatter_single(p, write, u, 0)?)).collect()
        };
        let (pk, pv) = (scatter(pk, uk)?, scatter(pv, uv)?);
        self.pool.put(layer as usize, (pk.clone(), pv.clone()));
        if self.written.len() <= layer as usize {
            self.written.resize(layer as usize + 1, false);
        }
        self.written[layer as usize] = true;
        self.attend_over(layer as usize, &q, &pk, &pv, (&kd, &vd), opts)
    }
}

impl PagedForward<'_> {
    /// A SHARED layer's attention: q [B, H, L, hd] over what layer `src`
    /// holds after this forward's write, masked by this layer's `opts`.
    fn attend_shared(&mut self, layer: u32, src: usize, q: &Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        let ready = self.written.get(src).copied().unwrap_or(false);
        let (pk, pv) = match (ready, self.pool.stored(src)) {
            (true, Some((k, v))) => (k.clone(), v.clone()),
            _ => {
                return Err(PluginError::other(format!(
                    "layer {layer} shares layer {src}'s K/V, which has not stored this forward's {} tokens yet",
                    self.len
                )))
            }
        };
        let (kd, vd) = match self.pool.layout(src) {
            Some(LayerLayout::Own { k, v }) => (k.dims, v.dims),
            _ => return Err(PluginError::other(format!("layer {layer} shares layer {src}, which stores no K/V"))),
        };
        self.attend_over(src, q, &pk, &pv, (&kd, &vd), opts)
    }

    /// q [B, H, L, hd] over the pool arrays `pk`/`pv` of layer `src` (this
    /// forward's tokens written), read through the rows' tables, masked
    /// causally per row and by `opts.window`.
    fn attend_over(
        &mut self,
        src: usize,
        q: &Array,
        pk: &[Array],
        pv: &[Array],
        (kd, vd): (&LayerDims, &LayerDims),
        opts: &AttendOpts<'_>,
    ) -> Result<Array, PluginError> {
        if let Some(w) = self.win.as_mut().filter(|_| self.pool.in_window(src)) {
            // A window layer: only its window's blocks are there.
            let group = self.pool.win.as_ref().map_or(0, |g| g.window);
            if opts.window == 0 || opts.window > group {
                return Err(PluginError::other(format!(
                    "layer {src}'s K/V is kept for a window of {group} positions; an attention with window {} cannot read it",
                    opts.window
                )));
            }
            let mask = w.mask(&self.offsets, self.len, opts.window, &self.runs).map_err(PluginError::unsupported)?;
            let paged = Paged { tables: &w.tables, block_size: self.pool.block_size as i32, ctx: w.ctx as i32, mask: Some(&mask), opts: *opts };
            return attend_paged(self.pool, src, q, pk, pv, (kd, vd), &paged);
        }
        let mask = self.mask(opts.window);
        // Rows at the same positions, no mask: the gather cut to their exact length (the mask, when there is one, spans ctx).
        let cut = self.exact.filter(|&e| e != self.ctx && opts.window == 0 && mask.is_none());
        let paged = Paged {
            tables: &self.tables,
            block_size: self.pool.block_size as i32,
            ctx: cut.unwrap_or(self.ctx) as i32,
            mask: mask.as_ref(),
            opts: *opts,
        };
        attend_paged(self.pool, src, q, pk, pv, (kd, vd), &paged)
    }
}

/// Whether positions `p` and `j` lie in one of `runs`.
pub(crate) fn same_run(runs: &[Range<usize>], p: usize, j: usize) -> bool {
    runs.iter().any(|r| r.contains(&p) && r.contains(&j))
}

/// One side's new vectors x [N, K, hd] encoded by its family into the
/// pool's components, each shaped [N, 1, ...] for a scatter of one update
/// per slot.
pub(super) fn encode_slots(codec: &dyn rmlx_plugin_api::author::kv::KvCodecImpl, family: &str, shape: &SideShape, x: &Array) -> Result<Vec<Array>, PluginError> {
    let rows = x.dim(0);
    let comps = codec.encode(x, &shape.dims)?;
    if comps.len() != shape.comps.len() {
        return Err(PluginError::other(format!(
            "KV family `{family}` encoded {} arrays for {} components",
            comps.len(),
            shape.comps.len()
        )));
    }
    comps
        .into_iter()
        .zip(&shape.comps)
        .map(|(a, c)| {
            let mut s = vec![rows, 1];
            s.extend(&c.shape);
            Ok(a.as_dtype(c.dtype)?.reshape(&s)?)
        })
        .collect()
}

/// The families' attention of q over layer `src`'s pools read as `paged` says.
pub(super) fn attend_paged(pool: &KvPool, src: usize, q: &Array, pk: &[Array], pv: &[Array], (kd, vd): (&LayerDims, &LayerDims), paged: &Paged) -> Result<Array, PluginError> {
    let (ks, vs) = (&pool.k, &pool.v);
    let (kc, vc) = (ks.codec_for(src), vs.codec_for(src));
    if ks.family == vs.family && ks.layer_codecs.is_empty() && vs.layer_codecs.is_empty() {
        kc.attend(q, pk, pv, paged, kd, vd)
    } else {
        composed_attend(kc, vc, q, pk, pv, paged, kd, vd)
    }
}

#[cfg(test)]
#[path = "paged_tests.rs"]
mod tests;
