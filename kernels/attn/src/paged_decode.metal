// The Metal twin of paged_decode.cu (same inputs, layout and algorithm; see
// there): one threadgroup per (row b, query head h), 4 simdgroups of 32.
// The family's prelude defines LOAD_K / LOAD_V. HEAD_MAJOR: as in the CUDA file.
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
  if (!HEAD_MAJOR && blk >= nblk) break;
  if (!valid[(long)b * ctx + t]) continue;
  const long row = HEAD_MAJOR ? ((long)b * K + kvh) * ctx + t
                              : ((long)tables[(long)b * nblk + blk] * BS + t % BS) * K + kvh;
  float s = 0.f;
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) s += qv[i] * (LOAD_K(row, i, d));
  }
  s = simd_sum(s);
  s *= scale;
  if (SOFTCAP) s = precise::tanh(s / cap) * cap;
  const float mn = max(m, s);
  const float corr = exp(m - mn);
  const float p = exp(s - mn);
  l = l * corr + p;
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) acc[i] = acc[i] * corr + p * (LOAD_V(row, i, d));
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
