// The Metal twin of rotated_decode.cu (same inputs, layout and algorithm; see
// there). One threadgroup per (row b, query head h) of 4 simdgroups of 32.
// Written for MLX's metal_kernel: the signature and the template constants
// are generated; `thread_position_in_threadgroup` and
// `threadgroup_position_in_grid` are bound by name.
constexpr int W = (D + 31) / 32;
constexpr int PER = (D + 31) / 32;
constexpr int WARPS = 4;
const int h = threadgroup_position_in_grid.y;
const int b = threadgroup_position_in_grid.z;
const int tid = thread_position_in_threadgroup.x;
const int warp = tid / 32;
const int lane = tid % 32;
const int kvh = h / (H / K);
const int nblk = tables_shape[1];
const int ctx = valid_shape[1];
const float scale = params[0];
const float cap = params[1];

float qv[PER];
float acc[PER];
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  qv[i] = d < D ? q[((long)b * H + h) * D + d] : 0.f;
  acc[i] = 0.f;
}
float m = -INFINITY;
float l = 0.f;
for (int t = warp; t < ctx; t += WARPS) {
  const int blk = t / BS;
  if (blk >= nblk) break;
  if (!valid[(long)b * ctx + t]) continue;
  const long slot = (long)tables[(long)b * nblk + blk] * BS + t % BS;
  const long kbase = (slot * K + kvh) * (KB * W);
  const long knb = (slot * K + kvh) * (D / KG);
  float s = 0.f;
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      uint code = 0;
      for (int j = 0; j < KB; ++j) code |= ((kc[kbase + j * W + i] >> lane) & 1u) << j;
      s += qv[i] * klv[code] * float(kn[knb + d / KG]);
    }
  }
  s = simd_sum(s);
  s *= scale;
  if (SOFTCAP) s = precise::tanh(s / cap) * cap;
  const float mn = max(m, s);
  const float corr = exp(m - mn);
  const float p = exp(s - mn);
  l = l * corr + p;
  const long vbase = (slot * K + kvh) * (VB * W);
  const long vnb = (slot * K + kvh) * (D / VG);
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      uint code = 0;
      for (int j = 0; j < VB; ++j) code |= ((vc[vbase + j * W + i] >> lane) & 1u) << j;
      acc[i] = acc[i] * corr + p * vlv[code] * float(vn[vnb + d / VG]);
    }
  }
  m = mn;
}

threadgroup float sm[WARPS];
threadgroup float sl[WARPS];
threadgroup float sacc[WARPS * D];
if (lane == 0) {
  sm[warp] = m;
  sl[warp] = l;
}
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) sacc[warp * D + d] = acc[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float big = -INFINITY;
for (int w = 0; w < WARPS; ++w) big = max(big, sm[w]);
if (HAS_SINKS) big = max(big, sinks[h]);
float f[WARPS];
float denom = 0.f;
for (int w = 0; w < WARPS; ++w) {
  f[w] = sm[w] == -INFINITY ? 0.f : exp(sm[w] - big);
  denom += sl[w] * f[w];
}
if (HAS_SINKS) denom += exp(sinks[h] - big);
for (int d = tid; d < D; d += 128) {
  float a = 0.f;
  for (int w = 0; w < WARPS; ++w) a += sacc[w * D + d] * f[w];
  out[((long)b * H + h) * D + d] = denom > 0.f ? a / denom : 0.f;
}
