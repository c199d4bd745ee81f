// Row-wise steps of the MAC layer on 16-wide rows (one vector each), for the CPU, where the
// library's operators, built for wide rows, cost several times the arithmetic:
//   * the encoder layer's residual connection and layer norm, y = LayerNorm(x + r), forward and
//     backward;
//   * the MAC query, silu(normalize(x W^T + b)) or normalize(x W^T + b), forward only;
//   * the memory's keys and values, normalize(silu(x K^T)) and silu(x V^T), forward only.
//
// Shape legend: M rows, D = 16 row width.

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cmath>

#include "status.h"
#include "vector.h"

namespace {

constexpr int D = V;  // one row is one vector
constexpr int64_t SPLIT = 1024;  // rows from which the forward passes use the thread pool

}  // namespace

extern "C" {

// out (M, D) = LayerNorm(x + r) with weight w and bias b (r may be null: LayerNorm(x)); with
// proj_w (D, D) and proj_b (D) given, r is first projected: LayerNorm(x + r proj_w^T + proj_b)
// (the encoder layer's attention output projection and post-norm, in one pass).
int titans_layer_norm_forward(const float* x, const float* r, const float* w, const float* b,
                              int64_t M, float eps, float* out, int threads,
                              const float* proj_w, const float* proj_b) {
  if (M < 0) return kUnsupportedSize;
  const vf wv = load(w), bv = load(b);
  float pt[D * D];  // proj_w^T: row k holds the weights of input k
  if (proj_w)
    for (int o = 0; o < D; ++o)
      for (int k = 0; k < D; ++k) pt[k * D + o] = proj_w[o * D + k];
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (M >= SPLIT)
  for (int64_t i = 0; i < M; ++i) {
    vf s = load(x + i * D);
    if (proj_w) {
      vf a = load(proj_b), odd = vf{};
      for (int k = 0; k < D; k += 2) {
        a += r[i * D + k] * load(pt + k * D);
        odd += r[i * D + k + 1] * load(pt + (k + 1) * D);
      }
      s += a + odd;
    } else if (r) {
      s += load(r + i * D);
    }
    store(out + i * D, layer_norm(s, wv, bv, eps));
  }
  return kOk;
}

// From g = d loss / d out: gx (M, D), which is also the gradient of r, and gw, gb (D).
// Rows split over up to `threads` threads from SPLIT rows on; their partial sums of gw and gb
// are added in thread order, so the result does not depend on which thread finished first.
int titans_layer_norm_backward(const float* x, const float* r, const float* w, const float* g,
                               int64_t M, float eps, float* gx, float* gw, float* gb,
                               int threads) {
  if (M < 0) return kUnsupportedSize;
  constexpr int MAX_THREADS = 64;
  const int T = M >= SPLIT ? (threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads))
                           : 1;
  const vf wv = load(w);
  vf gw_part[MAX_THREADS], gb_part[MAX_THREADS];
  for (int t = 0; t < T; ++t) gw_part[t] = gb_part[t] = vf{};
#pragma omp parallel num_threads(T) if (T > 1)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    vf gw_acc = vf{}, gb_acc = vf{};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const Standardized n = standardize(r ? load(x + i * D) + load(r + i * D) : load(x + i * D),
                                         eps);
      const vf gi = load(g + i * D), gxhat = gi * wv;
      gw_acc += gi * n.xhat;
      gb_acc += gi;
      const float m1 = hsum(gxhat) * (1.0f / D), m2 = hsum(gxhat * n.xhat) * (1.0f / D);
      store(gx + i * D, (gxhat - m1 - n.xhat * m2) * n.rstd);
    }
    gw_part[t] = gw_acc;
    gb_part[t] = gb_acc;
  }
  vf gw_sum = vf{}, gb_sum = vf{};
  for (int t = 0; t < T; ++t) gw_sum += gw_part[t], gb_sum += gb_part[t];
  store(gw, gw_sum);
  store(gb, gb_sum);
  return kOk;
}

// out (M, D) = normalize(x W^T + b), then silu if asked (W (D, D) as nn.Linear keeps it).
int titans_query_forward(const float* x, const float* w, const float* b, int64_t M,
                         int then_silu, float* out, int threads) {
  if (M < 0) return kUnsupportedSize;
  float wt[D * D];  // W^T: row k holds the weights of input k
  for (int o = 0; o < D; ++o)
    for (int k = 0; k < D; ++k) wt[k * D + o] = w[o * D + k];
  const vf bv = load(b);
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (M >= SPLIT)
  for (int64_t i = 0; i < M; ++i) store(out + i * D, query_row(x + i * D, wt, bv, then_silu));
  return kOk;
}

// keys (M, D) = normalize(silu(x K^T)), values (M, D) = silu(x V^T), for K, V (D, D).
int titans_keys_values_forward(const float* x, const float* key_w, const float* value_w,
                               int64_t M, float* keys, float* values, int threads) {
  if (M < 0) return kUnsupportedSize;
  float kt[D * D], vt[D * D];  // K^T, V^T: row k holds the weights of input k
  for (int o = 0; o < D; ++o)
    for (int k = 0; k < D; ++k)
      kt[k * D + o] = key_w[o * D + k], vt[k * D + o] = value_w[o * D + k];
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (M >= SPLIT)
  for (int64_t i = 0; i < M; ++i)
    key_value_row(x + i * D, kt, vt, keys + i * D, values + i * D);
  return kOk;
}

}  // extern "C"
