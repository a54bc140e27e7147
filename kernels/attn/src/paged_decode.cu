// Decode attention (one query per row) straight over a KV family's paged
// blocks, read through the rows' block tables: no gather copy, nothing
// decoded to full precision in memory. The family's prelude (lib.rs) defines
// LOAD_K(row, i, d) / LOAD_V(row, i, d): coordinate d (= lane + 32 i) of the
// key / value in pool row `row` (= slot * K + kv head), as float.
//
// One thread block per (row b, query head h), WARPS warps of 32: warp w takes
// tokens t = w, w + WARPS, ...; lane l holds coordinates d = l, l + 32, ...
// Online softmax per warp (scale, soft-cap), then the warps combine, with
// the per-head sink logit as an extra softmax column that carries no value.
//
// inputs: q float [B, H, D]; the family's pools; tables int32 [B, NBLK];
// valid bool [B, CTX]; params float [2] (scale, soft-cap); sinks float [H].
// output: out float [B, H, D].
// template: D, H, K, BS, HAS_SINKS, SOFTCAP, HEAD_MAJOR (+ the family's).
// HEAD_MAJOR: the pools are one sequence per row b, laid out [B, K, CTX, D]
// (the compiled step's contiguous buffers, engine/compiled.rs): pool row
// (b * K + kv head) * CTX + t, no tables (a dummy [1, 1] is passed).
constexpr int PER = (D + 31) / 32;
constexpr int WARPS = 4;
const int h = blockIdx.y;
const int b = blockIdx.z;
const int warp = threadIdx.x / 32;
const int lane = threadIdx.x % 32;
const int kvh = h / (H / K);
const int nblk = tables_shape[1];
const int ctx = valid_shape[1];
const float scale = params[0];
const float cap = params[1];

// NVRTC has no `inf`/INFINITY without headers: the bit pattern of +inf.
const float inf = __int_as_float(0x7f800000);

float qv[PER];
float acc[PER];
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  qv[i] = d < D ? q[((int64_t)b * H + h) * D + d] : 0.f;
  acc[i] = 0.f;
}
float m = -inf;
float l = 0.f;
for (int t = warp; t < ctx; t += WARPS) {
  const int blk = t / BS;
  if (!HEAD_MAJOR && blk >= nblk) break;
  if (!valid[(int64_t)b * ctx + t]) continue;
  const int64_t row = HEAD_MAJOR ? ((int64_t)b * K + kvh) * ctx + t
                                 : ((int64_t)tables[(int64_t)b * nblk + blk] * BS + t % BS) * K + kvh;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) s += qv[i] * (LOAD_K(row, i, d));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  s *= scale;
  if (SOFTCAP) s = tanhf(s / cap) * cap;
  const float mn = fmaxf(m, s);
  const float corr = expf(m - mn);
  const float p = expf(s - mn);
  l = l * corr + p;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) acc[i] = acc[i] * corr + p * (LOAD_V(row, i, d));
  }
  m = mn;
}

__shared__ float sm[WARPS];
__shared__ float sl[WARPS];
__shared__ float sacc[WARPS][D];
if (lane == 0) {
  sm[warp] = m;
  sl[warp] = l;
}
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) sacc[warp][d] = acc[i];
}
__syncthreads();
float big = -inf;
for (int w = 0; w < WARPS; ++w) big = fmaxf(big, sm[w]);
if (HAS_SINKS) big = fmaxf(big, sinks[h]);
float f[WARPS];
float denom = 0.f;
for (int w = 0; w < WARPS; ++w) {
  f[w] = sm[w] == -inf ? 0.f : expf(sm[w] - big);
  denom += sl[w] * f[w];
}
if (HAS_SINKS) denom += expf(sinks[h] - big);
for (int d = threadIdx.x; d < D; d += blockDim.x) {
  float a = 0.f;
  for (int w = 0; w < WARPS; ++w) a += sacc[w][d] * f[w];
  out[((int64_t)b * H + h) * D + d] = denom > 0.f ? a / denom : 0.f;
}
