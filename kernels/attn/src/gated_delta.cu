// The gated delta rule (the recurrence of the Qwen3-Next / Qwen3.5 gated
// DeltaNet) over T tokens in one launch, the state kept in float32
// registers from the first token to the last. Per value head h and token t:
//   S <- g S                      (scalar decay)
//   S <- S + k (beta (v - S k))^T (delta rule; S is [Dv, Dk], rows of Dk)
//   y  = S q
// with key head h / (Hv / Hk) feeding value head h (GQA). A masked token
// (the masked variant, mask false) leaves S as it is and writes y = 0.
//
// One warp per state row (b, h, i): lane l holds S[i][d] for d = l, l + 32,
// ..., so the two dot products over Dk (S k and S q) are warp sums. ROWS
// warps of a block take consecutive rows i of the same (b, h) and so read
// the same q and k.
//
// inputs: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv];
// state [B, Hv, Dv, Dk] (float32); mask bool [B, T] in the masked variant,
// whose prelude defines GD_VALID(bt) as mask[bt] (else it is true).
// outputs: y [B, T, Hv, Dv] (q's dtype), state_out [B, Hv, Dv, Dk] float32.
// template: Hk, Hv, Dk, Dv; DTYPES and SRC only tell the input dtypes and
// this source's versions apart in MLX's kernel caches (keyed on the name and
// the template values).
constexpr int PER = (Dk + 31) / 32;
const int lane = threadIdx.x;
const int row = blockIdx.y * blockDim.y + threadIdx.y;
const int n = blockIdx.z; // b * Hv + h
if (row >= Dv) return;
const int b = n / Hv;
const int h = n % Hv;
const int hk = h / (Hv / Hk);
const int T = v_shape[1];
(void)DTYPES;
(void)SRC;

float s[PER];
const float* s_in = state + ((int64_t)n * Dv + row) * Dk;
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  s[i] = d < Dk ? s_in[d] : 0.f;
}

// Token t + 1's inputs are loaded while token t is computed (the loop is a
// chain of two warp sums per token; the loads need not wait for it).
float kn[PER];
float qn[PER];
float vn = 0.f;
float gn = 0.f;
float bn = 0.f;
auto load = [&](int t) {
  const int64_t bt = (int64_t)b * T + t;
  const int64_t gh = bt * Hv + h;         // into g, beta: [B, T, Hv]
  const int64_t qk = (bt * Hk + hk) * Dk; // into q, k: [B, T, Hk, Dk]
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    kn[i] = d < Dk ? static_cast<float>(k[qk + d]) : 0.f;
    qn[i] = d < Dk ? static_cast<float>(q[qk + d]) : 0.f;
  }
  vn = static_cast<float>(v[gh * Dv + row]); // v: [B, T, Hv, Dv]
  gn = static_cast<float>(g[gh]);
  bn = static_cast<float>(beta[gh]);
};
load(0);

for (int t = 0; t < T; ++t) {
  float kk[PER];
  float qq[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    kk[i] = kn[i];
    qq[i] = qn[i];
  }
  const float vt = vn;
  const float gt = gn;
  const float beta_t = bn;
  if (t + 1 < T) load(t + 1);
  const int64_t bt = (int64_t)b * T + t;
  const int64_t vy = (bt * Hv + h) * Dv + row; // into y: [B, T, Hv, Dv]
  if (!(GD_VALID(bt))) {
    if (lane == 0) gd_put(y + vy, 0.f);
    continue;
  }
  float mem = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    s[i] *= gt;
    mem += s[i] * kk[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mem += __shfl_xor_sync(0xffffffffu, mem, o);
  const float delta = (vt - mem) * beta_t;
  float out = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    s[i] += kk[i] * delta;
    out += s[i] * qq[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) out += __shfl_xor_sync(0xffffffffu, out, o);
  if (lane == 0) gd_put(y + vy, out);
}

float* s_out = state_out + ((int64_t)n * Dv + row) * Dk;
#pragma unroll
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < Dk) s_out[d] = s[i];
}
