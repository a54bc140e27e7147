// Encode of the rotation families (turbo, planar, iso, rotor; kv-quant's
// rotated.rs): one step's new key or value vectors -> bit-plane packed
// Lloyd-Max codes, group norms and (QJL) residual signs and norm, in one
// kernel instead of the composed primitives (rotation, norms, codebook
// search, bit planes).
//
// One warp (thread block of 32) per vector, blocks along x: lane l holds coordinates d = l + 32 i (i < PER).
// 1. rotate: ROT 0 = Walsh-Hadamard with random signs (radix-2 butterflies
//    in ascending strides, as MLX's hadamard_transform, then * params[0]),
//    1 = block-diagonal (BG blocks of BN x BN, the rest passes), 2 = a dense
//    [D, D] matrix, y = x R;
// 2. one norm per group of G rotated coordinates, y / max(norm, 1e-30);
// 3. code = the number of codebook boundaries below y (strict >), the level
//    it stands for; PRESERVE: the stored norm is norm / max(||levels||, 1e-30);
// 4. bit planes: word j * WRD + i of a vector holds bit j of the codes of
//    coordinates 32 i .. 32 i + 31 (one ballot per plane and word);
// 5. QJL (G = D): r = y - level, the signs of S r as one bit plane, ||r||.
//
// inputs: x float [N, K, D]; rot float (signs [D] | blocks [BG, BN, BN] |
// matrix [D, D]); cb float [2^BITS - 1 boundaries, then 2^BITS levels];
// params float [1] (the Hadamard scale); s float [D, D] (QJL's S, row-major;
// a dummy without QJL).
// output: out uint32 [N, K, TOT]: codes [BITS * WRD], the group norms as
// float bits [D / G], then with QJL the signs [WRD] and ||r|| as float bits.
// template: D, BITS, G, ROT, BN, BG, QJL, PRESERVE.
constexpr int PER = (D + 31) / 32;
constexpr int WRD = (D + 31) / 32;
constexpr int NLV = 1 << BITS;
constexpr int NGR = D / G;
constexpr int WC = BITS * WRD;
constexpr int TOT = WC + NGR + (QJL ? WRD + 1 : 0);
constexpr unsigned FULL = 0xffffffffu;
const int64_t v = blockIdx.x;
const int lane = threadIdx.x;

__shared__ float xs[D];
__shared__ float ns[NGR];

float z[PER];
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  z[i] = d < D ? static_cast<float>(x[v * D + d]) : 0.f;
}

if (ROT == 0) {
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) z[i] = __fmul_rn(z[i], rot[d]);
  }
  // strides 1 .. 16: the partner is lane ^ h (lanes >= D stay among themselves)
  for (int h = 1; h < D && h < 32; h <<= 1) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const float o = __shfl_xor_sync(FULL, z[i], h);
      z[i] = (lane & h) ? __fsub_rn(o, z[i]) : __fadd_rn(z[i], o);
    }
  }
  // strides 32, 64, ..: the partner is register i ^ m of the same lane
#pragma unroll
  for (int m = 1; m < PER; m <<= 1) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      if ((i & m) == 0) {
        const float a = z[i];
        const float b = z[i | m];
        z[i] = __fadd_rn(a, b);
        z[i | m] = __fsub_rn(a, b);
      }
    }
  }
  const float sc = params[0];
#pragma unroll
  for (int i = 0; i < PER; ++i) z[i] = __fmul_rn(z[i], sc);
} else {
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) xs[d] = z[i];
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d >= D) continue;
    float acc = 0.f;
    if (ROT == 1) {
      const int g = d / BN;
      const int a = d % BN;
      if (g < BG) {
        for (int j = 0; j < BN; ++j) acc = __fadd_rn(acc, __fmul_rn(xs[g * BN + j], rot[(g * BN + a) * BN + j]));
      } else {
        acc = xs[d];
      }
    } else {
      for (int j = 0; j < D; ++j) acc = fmaf(xs[j], rot[j * D + d], acc);
    }
    z[i] = acc;
  }
  __syncwarp();
}

// group norms of the rotated vector
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) xs[d] = z[i];
}
__syncwarp();
for (int g = lane; g < NGR; g += 32) {
  float s2 = 0.f;
  for (int t = 0; t < G; ++t) s2 = __fadd_rn(s2, __fmul_rn(xs[g * G + t], xs[g * G + t]));
  ns[g] = __fsqrt_rn(s2);
}
__syncwarp();

// codes and levels (levels go to xs: every lane has read its z already)
uint32_t code[PER];
float y[PER];
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  code[i] = 0u;
  y[i] = 0.f;
  if (d < D) {
    y[i] = __fdiv_rn(z[i], fmaxf(ns[d / G], 1e-30f));
    uint32_t c = 0u;
    for (int k = 0; k < NLV - 1; ++k) c += y[i] > cb[k] ? 1u : 0u;
    code[i] = c;
  }
}
__syncwarp();
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < D) xs[d] = cb[NLV - 1 + code[i]];
}
__syncwarp();

uint32_t* o = out + v * TOT;
#pragma unroll
for (int i = 0; i < PER; ++i) {
#pragma unroll
  for (int j = 0; j < BITS; ++j) {
    const uint32_t w = __ballot_sync(FULL, (code[i] >> j) & 1u);
    if (lane == 0) o[j * WRD + i] = w;
  }
}
for (int g = lane; g < NGR; g += 32) {
  float st = ns[g];
  if (PRESERVE) {
    float c2 = 0.f;
    for (int t = 0; t < G; ++t) c2 = __fadd_rn(c2, __fmul_rn(xs[g * G + t], xs[g * G + t]));
    st = __fdiv_rn(st, fmaxf(__fsqrt_rn(c2), 1e-30f));
  }
  o[WC + g] = __float_as_uint(st);
}

if (QJL) {
  // r = y - level (G = D: one group), then S r
  __syncwarp();
  float r[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < D ? __fsub_rn(y[i], xs[d]) : 0.f;
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) xs[d] = r[i];
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    float p = 0.f;
    if (d < D) {
      for (int j = 0; j < D; ++j) p = fmaf(xs[j], s[(int64_t)d * D + j], p);
    }
    const uint32_t w = __ballot_sync(FULL, d < D && p >= 0.f);
    if (lane == 0) o[WC + NGR + i] = w;
  }
  if (lane == 0) {
    float s2 = 0.f;
    for (int t = 0; t < D; ++t) s2 = __fadd_rn(s2, __fmul_rn(xs[t], xs[t]));
    o[WC + NGR + WRD] = __float_as_uint(__fsqrt_rn(s2));
  }
}
