// The Metal twin of gated_delta.cu (same inputs, outputs, layout and
// algorithm; see there): one simdgroup per state row (b, h, i), lane l holds
// S[i][d] for d = l, l + 32, ...; the two dot products over Dk are
// simd_sum. The prelude defines GD_VALID(bt) (mask[bt], or true).
constexpr int PER = (Dk + 31) / 32;
const int lane = thread_position_in_threadgroup.x;
const int row = thread_position_in_grid.y;
const int n = thread_position_in_grid.z; // b * Hv + h
const int b = n / Hv;
const int h = n % Hv;
const int hk = h / (Hv / Hk);
const int T = v_shape[1];
(void)DTYPES;
(void)SRC;

float s[PER];
const long s_at = ((long)n * Dv + row) * Dk;
for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  s[i] = d < Dk ? state[s_at + d] : 0.f;
}

for (int t = 0; t < T; ++t) {
  const long bt = (long)b * T + t;
  const long gh = bt * Hv + h;       // into g, beta: [B, T, Hv]
  const long vy = gh * Dv + row;     // into v, y: [B, T, Hv, Dv]
  if (!(GD_VALID(bt))) {
    if (lane == 0) gd_put(y + vy, 0.f);
    continue;
  }
  const long qk = (bt * Hk + hk) * Dk; // into q, k: [B, T, Hk, Dk]
  const float gt = static_cast<float>(g[gh]);
  const float beta_t = static_cast<float>(beta[gh]);
  float kk[PER];
  float qq[PER];
  float mem = 0.f;
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    kk[i] = d < Dk ? static_cast<float>(k[qk + d]) : 0.f;
    qq[i] = d < Dk ? static_cast<float>(q[qk + d]) : 0.f;
    s[i] *= gt;
    mem += s[i] * kk[i];
  }
  mem = simd_sum(mem);
  const float delta = (static_cast<float>(v[vy]) - mem) * beta_t;
  float out = 0.f;
  for (int i = 0; i < PER; ++i) {
    s[i] += kk[i] * delta;
    out += s[i] * qq[i];
  }
  out = simd_sum(out);
  if (lane == 0) gd_put(y + vy, out);
}

for (int i = 0; i < PER; ++i) {
  const int d = lane + 32 * i;
  if (d < Dk) state_out[s_at + d] = s[i];
}
