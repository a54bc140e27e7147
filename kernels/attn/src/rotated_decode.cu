// Decode attention (one query per row) straight over the rotation families'
// compressed blocks: bit-plane packed codebook codes + group norms, read
// through the rows' block tables. One thread block per (row b, query head h),
// 4 warps; warp w takes the tokens t = w, w + 4, ...; lane i holds the
// coordinates d = i, i + 32, ... (so all lanes of a warp read the same code
// word, one bit each). Online softmax per warp, then the 4 warps combine.
// Everything stays in the rotated domain: q arrives rotated, the output
// leaves rotated (the caller un-rotates it once per head).
//
// inputs (generated signature, see MLX's cuda custom kernel):
//   q      float  [B, H, D]             rotated query
//   kc     uint32 [S, K, KB * W]        key codes (S slots of the pool)
//   kn     T      [S, K, D / KG]        key group norms
//   vc     uint32 [S, K, VB * W]        value codes
//   vn     T      [S, K, D / VG]        value group norms
//   tables int32  [B, NBLK]             block ids per row
//   valid  bool   [B, CTX]              which positions the query sees
//   klv    float  [2^KB]                key codebook levels
//   vlv    float  [2^VB]                value codebook levels
//   params float  [2]                   scale, soft-cap
//   sinks  float  [H]                   per-head sink logits (HAS_SINKS)
// output: out float [B, H, D]
// template: D, H, K, KB, VB, KG, VG, BS, HAS_SINKS, SOFTCAP
constexpr int W = (D + 31) / 32;
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
  if (blk >= nblk) break;
  if (!valid[(int64_t)b * ctx + t]) continue;
  const int64_t slot = (int64_t)tables[(int64_t)b * nblk + blk] * BS + t % BS;
  const uint32_t* kw = kc + (slot * K + kvh) * (KB * W);
  const auto* knp = kn + (slot * K + kvh) * (D / KG);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      uint32_t code = 0;
#pragma unroll
      for (int j = 0; j < KB; ++j) code |= ((kw[j * W + i] >> lane) & 1u) << j;
      s += qv[i] * klv[code] * static_cast<float>(knp[d / KG]);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  s *= scale;
  if (SOFTCAP) s = tanhf(s / cap) * cap;
  const float mn = fmaxf(m, s);
  const float corr = expf(m - mn);
  const float p = expf(s - mn);
  l = l * corr + p;
  const uint32_t* vw = vc + (slot * K + kvh) * (VB * W);
  const auto* vnp = vn + (slot * K + kvh) * (D / VG);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      uint32_t code = 0;
#pragma unroll
      for (int j = 0; j < VB; ++j) code |= ((vw[j * W + i] >> lane) & 1u) << j;
      acc[i] = acc[i] * corr + p * vlv[code] * static_cast<float>(vnp[d / VG]);
    }
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
