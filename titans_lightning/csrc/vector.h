// Vector arithmetic shared by the kernels: 16-lane float and integer vectors (GCC/Clang vector
// types, lowered to whatever the machine has), loads, stores and a sigmoid to about 1 ulp.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
// sigmoid(a) = 1 / (1 + exp(-a)). exp is Cephes' single-precision polynomial (about 1 ulp) with
// the 2^n scaling done by vscalefps; a is clamped at -88 so 1 + exp(-a) stays finite (the
// caller multiplies by a itself, which carries a NaN through). The 14-bit reciprocal estimate
// and one Newton step replace a division, which is slow on wide vectors.
inline vf sigmoid(vf a) {
  const __m512 x = _mm512_max_ps((__m512)a, _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693359375f), x);  // -x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(y, n), _mm512_set1_ps(1.0f));  // 1 + exp(-x)
  const __m512 e = _mm512_rcp14_ps(d);
  return (vf)_mm512_fmadd_ps(e, _mm512_fnmadd_ps(d, e, _mm512_set1_ps(1.0f)), e);
}
#else
// exp(x), Cephes' single-precision polynomial (about 1 ulp); x is clamped to [-87.3, 88] so
// that 2^n stays a normal float. NaN does not survive the clamp: callers multiply by their
// own input afterwards, which carries a NaN through.
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

inline vf sigmoid(vf a) { return 1.0f / (1.0f + exp_(-a)); }
#endif

}  // namespace
