// The Metal twin of rotated_encode.cu (same inputs, output layout and
// algorithm; see there): one simdgroup of 32 per vector, threadgroups along x.
constexpr int PER = (D + 31) / 32;
constexpr int WRD = (D + 31) / 32;
constexpr int NLV = 1 << BITS;
constexpr int NGR = D / G;
constexpr int WC = BITS * WRD;
constexpr int TOT = WC + NGR + (QJL ? WRD + 1 : 0);
const long v = threadgroup_position_in_grid.x;
const int lane = thread_position_in_threadgroup.x;

threadgroup float xs[D];
threadgroup float ns[NGR];

float z[PER];
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  z[i] = d < D ? static_cast<float>(x[v * D + d]) : 0.f;
}

if (ROT == 0) {
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) z[i] = z[i] * rot[d];
  }
  for (int h = 1; h < D && h < 32; h <<= 1) {
    for (int i = 0; i < PER; ++i) {
      const float o = simd_shuffle_xor(z[i], ushort(h));
      z[i] = (lane & h) ? (o - z[i]) : (z[i] + o);
    }
  }
  for (int m = 1; m < PER; m <<= 1) {
    for (int i = 0; i < PER; ++i) {
      if ((i & m) == 0) {
        const float a = z[i];
        const float b = z[i | m];
        z[i] = a + b;
        z[i | m] = a - b;
      }
    }
  }
  const float sc = params[0];
  for (int i = 0; i < PER; ++i) z[i] = z[i] * sc;
} else {
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) xs[d] = z[i];
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d >= D) continue;
    float acc = 0.f;
    if (ROT == 1) {
      const int g = d / BN;
      const int a = d % BN;
      if (g < BG) {
        for (int j = 0; j < BN; ++j) acc = acc + xs[g * BN + j] * rot[(g * BN + a) * BN + j];
      } else {
        acc = xs[d];
      }
    } else {
      for (int j = 0; j < D; ++j) acc = fma(xs[j], rot[j * D + d], acc);
    }
    z[i] = acc;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
}

for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) xs[d] = z[i];
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int g = lane; g < NGR; g += 32) {
  float s2 = 0.f;
  for (int t = 0; t < G; ++t) s2 = s2 + xs[g * G + t] * xs[g * G + t];
  ns[g] = precise::sqrt(s2);
}
simdgroup_barrier(mem_flags::mem_threadgroup);

uint32_t code[PER];
float y[PER];
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  code[i] = 0u;
  y[i] = 0.f;
  if (d < D) {
    y[i] = precise::divide(z[i], max(ns[d / G], 1e-30f));
    uint32_t c = 0u;
    for (int k = 0; k < NLV - 1; ++k) c += y[i] > cb[k] ? 1u : 0u;
    code[i] = c;
  }
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) xs[d] = cb[NLV - 1 + code[i]];
}
simdgroup_barrier(mem_flags::mem_threadgroup);

device uint32_t* o = out + v * TOT;
for (int i = 0; i < PER; ++i) {
  for (int j = 0; j < BITS; ++j) {
    const bool bit = ((code[i] >> j) & 1u) != 0u;
    const uint32_t w = static_cast<uint32_t>(static_cast<simd_vote::vote_t>(simd_ballot(bit)));
    if (lane == 0) o[j * WRD + i] = w;
  }
}
for (int g = lane; g < NGR; g += 32) {
  float st = ns[g];
  if (PRESERVE) {
    float c2 = 0.f;
    for (int t = 0; t < G; ++t) c2 = c2 + xs[g * G + t] * xs[g * G + t];
    st = precise::divide(st, max(precise::sqrt(c2), 1e-30f));
  }
  o[WC + g] = as_type<uint32_t>(st);
}

if (QJL) {
  simdgroup_barrier(mem_flags::mem_threadgroup);
  float r[PER];
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < D ? y[i] - xs[d] : 0.f;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) xs[d] = r[i];
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    float p = 0.f;
    if (d < D) {
      for (int j = 0; j < D; ++j) p = fma(xs[j], s[(long)d * D + j], p);
    }
    const bool bit = d < D && p >= 0.f;
    const uint32_t w = static_cast<uint32_t>(static_cast<simd_vote::vote_t>(simd_ballot(bit)));
    if (lane == 0) o[WC + NGR + i] = w;
  }
  if (lane == 0) {
    float s2 = 0.f;
    for (int t = 0; t < D; ++t) s2 = s2 + xs[t] * xs[t];
    o[WC + NGR + WRD] = as_type<uint32_t>(precise::sqrt(s2));
  }
}
