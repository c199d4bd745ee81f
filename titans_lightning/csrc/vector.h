// Vector arithmetic shared by the kernels: 16-lane float and integer vectors (GCC/Clang vector
// types, lowered to whatever the machine has), loads, stores and a sigmoid to about 1 ulp.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int V = 16;  // lanes per vector

typedef float vf __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }

#if defined(__AVX512F__)
// exp(x) for x clamped to at most 88: Cephes' single-precision polynomial (about 1 ulp), the
// 2^n scaling by vscalefps, which also takes very negative x to 0. A NaN comes out as a finite
// number: callers that must carry NaN through multiply by their own input afterwards.
inline vf exp_(vf v) {
  const __m512 x = _mm512_min_ps((__m512)v, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return (vf)_mm512_scalef_ps(y, n);
}

// 1 / d: the 14-bit reciprocal estimate and one Newton step (a division is slow on wide vectors).
inline vf reciprocal(vf d) {
  const __m512 e = _mm512_rcp14_ps((__m512)d);
  return (vf)_mm512_fmadd_ps(e, _mm512_fnmadd_ps((__m512)d, e, _mm512_set1_ps(1.0f)), e);
}
#else
// exp(x), Cephes' single-precision polynomial (about 1 ulp); x is clamped to [-87.3, 88] so
// that 2^n stays a normal float (a NaN comes out finite, as above).
inline vf exp_(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.33654475f), magic = splat(12582912.0f);  // 1.5 * 2^23
  x = x < hi ? x : hi;
  x = x > lo ? x : lo;
  vf n = x * 1.44269504088896341f + magic;  // round(x / ln 2) in the low mantissa bits
  vi ni = (vi)n - (vi)magic;
  n = n - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * (vf)((ni + 127) << 23);
}

inline vf reciprocal(vf d) { return 1.0f / d; }
#endif

// The largest and the sum of a vector's lanes.
inline float hmax(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int l = 1; l < V; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int l = 0; l < V; ++l) s += v[l];
  return s;
#endif
}

// One row s of V = 16 features standardised: xhat = (s - mean) * rstd, rstd = 1 / sqrt(var + eps).
struct Standardized {
  vf xhat;
  float rstd;
};

inline Standardized standardize(vf s, float eps) {
  const float mean = hsum(s) * (1.0f / V);
  const vf c = s - mean;
  const float rstd = 1.0f / std::sqrt(hsum(c * c) * (1.0f / V) + eps);
  return Standardized{c * rstd, rstd};
}

// LayerNorm of one row s: xhat * w + b.
inline vf layer_norm(vf s, vf w, vf b, float eps) { return standardize(s, eps).xhat * w + b; }

// sigmoid(a) = 1 / (1 + exp(-a)); a NaN comes out finite, a * sigmoid(a) is NaN.
#if defined(__AVX512F__)
// The feed-forward's bottleneck, so exp(-a) is its own: the negation folded into the range
// reduction, and a degree-5 minimax polynomial for e^r on |r| <= ln2 / 2 instead of Cephes'
// degree 7 (silu within 3.5 ulp instead of 2.3, 8 % faster feed-forward). -88 <= a keeps exp(-a),
// and with it the Newton step of the reciprocal, finite; a <= 88 keeps the range reduction exact
// (sigmoid(88) is 1 in float32).
inline vf sigmoid(vf v) {
  const __m512 a = _mm512_min_ps(_mm512_max_ps((__m512)v, _mm512_set1_ps(-88.0f)),
                                 _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(-1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693359375f), a);  // -a - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(8.2903075963e-3f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1897933930e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6667635739e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.9999150634e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.9999970198e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return reciprocal((vf)_mm512_add_ps(_mm512_scalef_ps(y, n), _mm512_set1_ps(1.0f)));
}
#else
inline vf sigmoid(vf a) { return reciprocal(1.0f + exp_(-a)); }
#endif

// The MAC query of one 16-wide row x: normalize(x W^T + b), then silu if asked, with wt = W^T
// (row k holds the weights of input k) and F.normalize's eps.
inline vf query_row(const float* x, const float* wt, vf b, bool then_silu) {
  vf a = b, odd = vf{};
  for (int k = 0; k < V; k += 2) {
    a += x[k] * load(wt + k * V);
    odd += x[k + 1] * load(wt + (k + 1) * V);
  }
  a += odd;
  const float norm = std::sqrt(hsum(a * a));
  a = a * (1.0f / (norm > 1e-12f ? norm : 1e-12f));
  return then_silu ? a * sigmoid(a) : a;
}

// The built-in memory rules' key and value of one 16-wide row x: normalize(silu(x K^T)) and
// silu(x V^T), with kt = K^T and vt = V^T (row k holds the weights of input k).
inline void key_value_row(const float* x, const float* kt, const float* vt, float* key,
                          float* value) {
  vf a = vf{}, b = vf{};
  for (int k = 0; k < V; ++k) {
    a += x[k] * load(kt + k * V);
    b += x[k] * load(vt + k * V);
  }
  a = a * sigmoid(a);
  const float norm = std::sqrt(hsum(a * a));
  store(key, a * (1.0f / (norm > 1e-12f ? norm : 1e-12f)));  // F.normalize's eps
  store(value, b * sigmoid(b));
}

// Counter-based dropout draws: a 64-bit mix of (seed, row) keys each row; the lowbias32 integer
// hash of key ^ (j * golden) gives 32 uniform bits for each column j of the row.
inline uint32_t row_key(uint64_t seed, int64_t r) {
  uint64_t z = seed + static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

inline vu hash32(vu h) {
  h ^= h >> 16;
  h *= 0x21f0aaadu;
  h ^= h >> 15;
  h *= 0x735a2d97u;
  h ^= h >> 15;
  return h;
}

// All ones in the lanes of columns j..j+V of a row (key) that are kept: draw >= threshold.
inline vu keep_lanes(uint32_t key, int64_t j, uint32_t threshold) {
  constexpr uint32_t G = 0x9E3779B9u;
  const vu lanes = {0, G, 2 * G, 3 * G, 4 * G, 5 * G, 6 * G, 7 * G, 8 * G, 9 * G, 10 * G, 11 * G,
                    12 * G, 13 * G, 14 * G, 15 * G};
  return (vu)(hash32((lanes + static_cast<uint32_t>(j) * G) ^ key) >= threshold);
}

}  // namespace
