// The encoder layer's attention core for the CPU, forward and backward:
//
//     out = dropout(softmax(q k^T / sqrt(e))) v        per window and head
//
// The windows are short (L = P + 2C tokens) and the heads narrow (e = 8), so the library's
// batched products and softmax spend more on dispatch and on odd-sized rows than on arithmetic.
// Here one thread takes a (window, head) pair at a time and keeps its L x L weights in cache; a
// row of weights is a few vectors over the keys (padded to a multiple of V with zero weight).
// Dropout keeps weight (row, j) unless hash(seed, row, j) < threshold, row = b * L + i, the
// same counter-based draws as the feed-forward's, so the backward pass draws them again.
//
// Shape legend: N windows, H heads, B = N * H, L tokens, e head width (4, 8, 16 or 32),
// d = H * e, Lp = L rounded up to a multiple of V. q, k, v are read where the input projection
// leaves them, (N, L, 3, H, e), and the output is written as (N, L, H, e), so neither is copied.

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cmath>
#include <vector>

#include "status.h"
#include "vector.h"

namespace {

struct Attention {
  const float* qkv;        // (N, L, 3, H, e): the input projection, as it comes
  float* p;                // (B, L, Lp): the softmax weights, before dropout (or null)
  int64_t B, L, Lp, H, d;  // B = N * H windows x heads, d = H * e
  int64_t in(int64_t b, int e) const { return (b / H) * L * 3 * d + (b % H) * e; }
  int64_t out(int64_t b, int e) const { return (b / H) * L * d + (b % H) * e; }
  float scale;             // 1 / sqrt(e)
  uint64_t seed;
  uint32_t threshold;      // 0: no dropout
  float keep_scale;        // 1 / (1 - p)
};

// A head-width row of e floats as one vector (e = 32 is two AVX-512 registers).
template <int e>
struct Row {
  typedef float type __attribute__((vector_size(e * 4)));
  static type load(const float* p) { type r; std::memcpy(&r, p, sizeof r); return r; }
  static void store(float* p, const type& r) { std::memcpy(p, &r, sizeof r); }
};

// x^T of one (window, head) block with rows `stride` apart, (e, Lp), zero in the padding.
template <int e>
void transpose_padded(const float* x, int64_t stride, int64_t L, int64_t Lp, float* xt) {
  std::memset(xt, 0, sizeof(float) * e * Lp);
  for (int64_t j = 0; j < L; ++j)
    for (int c = 0; c < e; ++c) xt[c * Lp + j] = x[j * stride + c];
}

// The dropped, scaled weights of row i: the kernel's draws applied to p.
inline vf drop(const Attention& A, vf p, uint32_t key, int64_t j0) {
  if (!A.threshold) return p;
  return keep_lanes(key, j0, A.threshold) ? p * A.keep_scale : vf{};
}

// Lanes of key block t that hold real keys (the last block is padded).
inline vu valid_lanes(int64_t L, int64_t t) {
  vu lane;
  for (int l = 0; l < V; ++l) lane[l] = static_cast<uint32_t>(l);
  return (vu)(lane + static_cast<uint32_t>(t * V) < static_cast<uint32_t>(L));
}

// Query rows i0 .. i0 + NR of one (window, head) block: NR rows at a time, so that their
// dependent chains (scores, max, exp, sum, product with v) overlap and each key and value
// vector is loaded once for all of them.
template <int e, int NR>
void forward_rows(const Attention& A, int64_t b, int64_t i0, const float* q, const float* v,
                  const float* kt, float* rows, float* out) {
  constexpr int MAX_BLOCKS = 16;  // L <= 256
  const int64_t L = A.L, Lp = A.Lp, nv = Lp / V, S = 3 * A.d;
  const vu last = valid_lanes(L, nv - 1);
  const vf minus_inf = splat(-INFINITY);
  vf s[NR][MAX_BLOCKS], top[NR];
  for (int r = 0; r < NR; ++r) top[r] = minus_inf;
  for (int64_t t = 0; t < nv; ++t) {  // scores q_i . k_j / sqrt(e), padding at -inf
    vf acc[NR] = {};
    for (int c = 0; c < e; ++c) {
      const vf kv = load(kt + c * Lp + t * V);
      for (int r = 0; r < NR; ++r) acc[r] += (q[(i0 + r) * S + c] * A.scale) * kv;
    }
    for (int r = 0; r < NR; ++r) {
      s[r][t] = t == nv - 1 ? (last ? acc[r] : minus_inf) : acc[r];
      top[r] = s[r][t] > top[r] ? s[r][t] : top[r];
    }
  }
  float inv[NR];
  for (int r = 0; r < NR; ++r) {
    const float m = hmax(top[r]);
    vf total = vf{};
    for (int64_t t = 0; t < nv; ++t) {
      s[r][t] = exp_(s[r][t] - m);
      if (t == nv - 1) s[r][t] = last ? s[r][t] : vf{};
      total += s[r][t];
    }
    inv[r] = 1.0f / hsum(total);
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t i = i0 + r;
    const uint32_t key = A.threshold ? row_key(A.seed, b * L + i) : 0;
    float* p = A.p ? A.p + (b * L + i) * Lp : nullptr;
    for (int64_t t = 0; t < nv; ++t) {
      const vf w = s[r][t] * inv[r];
      if (p) store(p + t * V, w);
      store(rows + r * Lp + t * V, drop(A, w, key, t * V));
    }
  }
  using E = Row<e>;
  typename E::type acc[NR][2] = {};  // two sums per row: one would wait on each addition
  int64_t j = 0;
  for (; j + 2 <= L; j += 2)
    for (int u = 0; u < 2; ++u) {
      const typename E::type vj = E::load(v + (j + u) * S);
      for (int r = 0; r < NR; ++r) acc[r][u] += rows[r * Lp + j + u] * vj;
    }
  if (j < L)
    for (int r = 0; r < NR; ++r) acc[r][0] += rows[r * Lp + j] * E::load(v + j * S);
  for (int r = 0; r < NR; ++r) E::store(out + (i0 + r) * A.d, acc[r][0] + acc[r][1]);
}

template <int e>
void forward_block(const Attention& A, int64_t b, float* kt, float* rows, float* out) {
  constexpr int NR = 4;
  const int64_t L = A.L, S = 3 * A.d;
  const float *q = A.qkv + A.in(b, e), *k = q + A.d, *v = q + 2 * A.d;
  out += A.out(b, e);
  transpose_padded<e>(k, S, L, A.Lp, kt);
  int64_t i = 0;
  for (; i + NR <= L; i += NR) forward_rows<e, NR>(A, b, i, q, v, kt, rows, out);
  for (; i < L; ++i) forward_rows<e, 1>(A, b, i, q, v, kt, rows, out);
}

// The backward pass of query rows i0 .. i0 + NR of one block: their gradients at the scores
// (gs, gpd: NR rows of Lp), then gq for the rows and their shares of gk and gv, each key and
// value row read and written once for all NR query rows.
template <int e, int NR>
void backward_rows(const Attention& A, int64_t b, int64_t i0, const float* q, const float* k,
                   const float* g, const float* vt, float* gpd, float* gs, float* gq, float* gk,
                   float* gv) {
  const int64_t L = A.L, Lp = A.Lp, nv = Lp / V, S = 3 * A.d, So = A.d;
  for (int r = 0; r < NR; ++r) {
    const int64_t i = i0 + r;
    const float* p = A.p + (b * L + i) * Lp;
    const uint32_t key = A.threshold ? row_key(A.seed, b * L + i) : 0;
    float *gpd_r = gpd + r * Lp, *gs_r = gs + r * Lp;
    vf dot = vf{};
    for (int64_t t = 0; t < nv; ++t) {
      vf gw = vf{};  // gradient at the dropped weights: g_i . v_j
      for (int c = 0; c < e; ++c) gw += g[i * So + c] * load(vt + c * Lp + t * V);
      const vf pv = load(p + t * V);
      store(gpd_r + t * V, drop(A, pv, key, t * V));  // the dropped weights, for gv
      gw = drop(A, gw, key, t * V);                     // gradient at the softmax output
      store(gs_r + t * V, gw);
      dot += pv * gw;
    }
    const float d = hsum(dot);
    for (int64_t t = 0; t < nv; ++t)  // through the softmax, and the scale of the scores
      store(gs_r + t * V, load(p + t * V) * (load(gs_r + t * V) - d) * A.scale);
  }
  using E = Row<e>;
  typename E::type gi[NR], qi[NR], acc[NR][2] = {};
  for (int r = 0; r < NR; ++r) {
    gi[r] = E::load(g + (i0 + r) * So);
    qi[r] = E::load(q + (i0 + r) * S);
  }
  for (int64_t j = 0; j < L; ++j) {
    typename E::type gvj = E::load(gv + j * S), gkj = E::load(gk + j * S);
    const typename E::type kj = E::load(k + j * S);
    for (int r = 0; r < NR; ++r) {
      gvj += gpd[r * Lp + j] * gi[r];
      gkj += gs[r * Lp + j] * qi[r];
      acc[r][j & 1] += gs[r * Lp + j] * kj;
    }
    E::store(gv + j * S, gvj);
    E::store(gk + j * S, gkj);
  }
  for (int r = 0; r < NR; ++r) E::store(gq + (i0 + r) * S, acc[r][0] + acc[r][1]);
}

template <int e>
void backward_block(const Attention& A, int64_t b, const float* g, float* vt, float* gpd,
                    float* gs, float* gqkv) {
  constexpr int NR = 4;
  const int64_t L = A.L, S = 3 * A.d;
  const float *q = A.qkv + A.in(b, e), *k = q + A.d, *v = q + 2 * A.d;
  g += A.out(b, e);
  float *gq = gqkv + A.in(b, e), *gk = gq + A.d, *gv = gq + 2 * A.d;
  transpose_padded<e>(v, S, L, A.Lp, vt);
  for (int64_t j = 0; j < L; ++j) {
    std::memset(gk + j * S, 0, sizeof(float) * e);
    std::memset(gv + j * S, 0, sizeof(float) * e);
  }
  int64_t i = 0;
  for (; i + NR <= L; i += NR) backward_rows<e, NR>(A, b, i, q, k, g, vt, gpd, gs, gq, gk, gv);
  for (; i < L; ++i) backward_rows<e, 1>(A, b, i, q, k, g, vt, gpd, gs, gq, gk, gv);
}

// Without dropout or kept weights (evaluation): the lanes of a vector are 16 queries, so the
// softmax runs down the keys lane by lane, with no reductions across lanes: per key, e products
// for the scores, one exponential and e products with v, for 16 queries at once. s is scratch
// for a column of scores (L, V). For e <= 8 (the accumulators stay in registers).
template <int e>
void forward_block_lanes(const Attention& A, int64_t b, float* s, float* out) {
  const int64_t L = A.L, S = 3 * A.d;
  const float *q = A.qkv + A.in(b, e), *k = q + A.d, *v = q + 2 * A.d;
  out += A.out(b, e);
  for (int64_t i0 = 0; i0 < L; i0 += V) {
    const int64_t n = L - i0 < V ? L - i0 : V;  // queries in this vector; the rest are zeros
    alignas(64) float lanes[e][V] = {};
    for (int64_t l = 0; l < n; ++l)
      for (int c = 0; c < e; ++c) lanes[c][l] = q[(i0 + l) * S + c] * A.scale;
    vf qt[e];  // q^T / sqrt(e): lane l of qt[c] is feature c of query i0 + l
    for (int c = 0; c < e; ++c) qt[c] = load(lanes[c]);
    vf top = splat(-INFINITY);
    for (int64_t j = 0; j < L; ++j) {  // the scores of key j for the 16 queries
      vf acc = vf{};
      for (int c = 0; c < e; ++c) acc += k[j * S + c] * qt[c];
      store(s + j * V, acc);
      top = acc > top ? acc : top;
    }
    vf total = vf{}, o[e] = {};
    for (int64_t j = 0; j < L; ++j) {
      const vf w = exp_(load(s + j * V) - top);
      total += w;
      for (int c = 0; c < e; ++c) o[c] += v[j * S + c] * w;
    }
    const vf inv = 1.0f / total;
    for (int c = 0; c < e; ++c) store(lanes[c], o[c] * inv);
    for (int64_t l = 0; l < n; ++l)
      for (int c = 0; c < e; ++c) out[(i0 + l) * A.d + c] = lanes[c][l];
  }
}

template <int e>
void forward_all(const Attention& A, float* out, int threads) {
  const bool lanes = e <= 8 && !A.p && !A.threshold;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt(e * A.Lp), rows(4 * A.Lp), scores(lanes ? A.L * V : 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < A.B; ++b) {
      if (lanes) forward_block_lanes<e>(A, b, scores.data(), out);
      else forward_block<e>(A, b, kt.data(), rows.data(), out);
    }
  }
}

template <int e>
void backward_all(const Attention& A, const float* g, float* gqkv, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> vt(e * A.Lp), gpd(4 * A.Lp), gs(4 * A.Lp);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < A.B; ++b)
      backward_block<e>(A, b, g, vt.data(), gpd.data(), gs.data(), gqkv);
  }
}

#define TITANS_HEAD_WIDTHS(fn, e, ...)  \
  switch (e) {                          \
    case 4: fn<4>(__VA_ARGS__); break;  \
    case 8: fn<8>(__VA_ARGS__); break;  \
    case 16: fn<16>(__VA_ARGS__); break; \
    case 32: fn<32>(__VA_ARGS__); break; \
    default: return kUnsupportedSize;   \
  }

constexpr int64_t MAX_TOKENS = 256;  // forward_rows keeps a row's scores in 16 vectors

int64_t padded(int64_t L) { return (L + V - 1) / V * V; }

bool sizes_supported(int64_t N, int64_t L, int64_t H) {
  return N >= 0 && H >= 1 && L >= 1 && L <= MAX_TOKENS;
}

}  // namespace

extern "C" {

// *Lp = L rounded up to a multiple of V: the row length of the weights p below.
int titans_attention_padded(int64_t L, int64_t* Lp) {
  if (L < 1 || L > MAX_TOKENS) return kUnsupportedSize;
  *Lp = padded(L);
  return kOk;
}

// out (N, L, H, e) = dropout(softmax(q k^T / sqrt(e))) v per window and head, from the input
// projection qkv (N, L, 3, H, e); p (N * H, L, Lp), unless null, receives the softmax weights
// (before dropout) for the backward pass. e must be 4, 8, 16 or 32, and 1 <= L <= MAX_TOKENS.
int titans_attention_forward(const float* qkv, int64_t N, int64_t L, int64_t H, int64_t e,
                             uint64_t seed, uint32_t threshold, float keep_scale, float* p,
                             float* out, int threads) {
  if (!sizes_supported(N, L, H)) return kUnsupportedSize;
  const Attention A{qkv, p, N * H, L, padded(L), H, H * e, 1.0f / std::sqrt(float(e)), seed,
                    threshold, keep_scale};
  return guarded([&] {
    TITANS_HEAD_WIDTHS(forward_all, e, A, out, threads < 1 ? 1 : threads)
    return kOk;
  });
}

// gqkv (N, L, 3, H, e) from g = d loss / d out (N, L, H, e), the forward's input and weights p.
int titans_attention_backward(const float* qkv, const float* p, const float* g, int64_t N,
                              int64_t L, int64_t H, int64_t e, uint64_t seed, uint32_t threshold,
                              float keep_scale, float* gqkv, int threads) {
  if (!sizes_supported(N, L, H)) return kUnsupportedSize;
  const Attention A{qkv, const_cast<float*>(p), N * H, L, padded(L), H, H * e,
                    1.0f / std::sqrt(float(e)), seed, threshold, keep_scale};
  return guarded([&] {
    TITANS_HEAD_WIDTHS(backward_all, e, A, g, gqkv, threads < 1 ? 1 : threads)
    return kOk;
  });
}

}  // extern "C"
