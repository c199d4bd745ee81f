// The two-layer neural memory M(q) = silu(q W1^T + b1) W2^T + b2, per slot, and its backward
// pass, for the CPU. The memory is small (d = 16 -> h = 32 -> d) and is called on a thousand rows
// twice per layer and window group, so a library call per product costs more than the products;
// here one call does a slot's rows, a row at a time in registers.
//
// Shape legend: S slots, R rows per slot, d width (16 or 32), h hidden width (16, 32 or 64).
// Fast weights per slot, flat: [W1 (h, d) | b1 (h) | W2 (d, h) | b2 (d)].

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <vector>

#include "vector.h"

namespace {

constexpr int B = 4;  // rows per block of the weight-gradient sums

struct Slot {
  const float *w1, *b1, *w2, *b2;  // views into the flat weights
  std::vector<float> w1t, w2t;     // W1^T (d, h), W2^T (h, d)
  Slot(const float* flat, int64_t d, int64_t h)
      : w1(flat), b1(flat + h * d), w2(flat + h * d + h), b2(flat + 2 * h * d + h),
        w1t(d * h), w2t(h * d) {
    for (int64_t j = 0; j < h; ++j)
      for (int64_t k = 0; k < d; ++k) {
        w1t[k * h + j] = w1[j * d + k];
        w2t[j * d + k] = w2[k * h + j];
      }
  }
};

// One row: a = q W1^T + b1, s = silu(a), out = s W2^T + b2 (a and s also written when given).
// dv = d / V and hv = h / V are compile-time constants, so the accumulators stay in registers.
template <int dv, int hv>
void forward_row(const Slot& w, const float* q, float* out, float* a_out, float* s_out) {
  constexpr int64_t d = dv * V, h = hv * V;
  alignas(64) float s[hv * V];
  // Sums are split over two (four) partial accumulators: one accumulator would make every
  // multiply-add wait for the previous one.
  vf acc[hv], odd[hv];
  for (int v = 0; v < hv; ++v) acc[v] = load(w.b1 + v * V), odd[v] = vf{};
  for (int64_t k = 0; k < d; k += 2)
    for (int v = 0; v < hv; ++v) {
      acc[v] += q[k] * load(w.w1t.data() + k * h + v * V);
      odd[v] += q[k + 1] * load(w.w1t.data() + (k + 1) * h + v * V);
    }
  for (int v = 0; v < hv; ++v) acc[v] += odd[v];
  for (int v = 0; v < hv; ++v) {
    const vf sv = acc[v] * sigmoid(acc[v]);
    store(s + v * V, sv);
    if (a_out) store(a_out + v * V, acc[v]);
    if (s_out) store(s_out + v * V, sv);
  }
  vf o[4][dv];
  for (int u = 0; u < dv; ++u) o[0][u] = load(w.b2 + u * V), o[1][u] = o[2][u] = o[3][u] = vf{};
  for (int64_t j = 0; j < h; j += 4)
    for (int t = 0; t < 4; ++t)
      for (int u = 0; u < dv; ++u) o[t][u] += s[j + t] * load(w.w2t.data() + (j + t) * d + u * V);
  for (int u = 0; u < dv; ++u) store(out + u * V, (o[0][u] + o[1][u]) + (o[2][u] + o[3][u]));
}

// The backward pass of one slot: gq (R, d) when given, gflat (n) when given.
template <int dv, int hv>
void backward_slot(const Slot& w, const float* q, const float* a, const float* s, const float* g,
                   int64_t R, float* gq, float* gw1) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  alignas(64) float ga[B][hv * V];  // gradient at the pre-activation, per row
  if (gw1) std::memset(gw1, 0, sizeof(float) * n);
  for (int64_t r0 = 0; r0 < R; r0 += B) {
    const int rows = R - r0 < B ? static_cast<int>(R - r0) : B;
    for (int b = 0; b < rows; ++b) {
      const int64_t row = r0 + b;
      const float* gr = g + row * d;
      for (int v = 0; v < hv; ++v) {  // through W2, then silu
        vf gs = vf{}, odd = vf{};
        for (int64_t u = 0; u < d; u += 2) {
          gs += gr[u] * load(w.w2 + u * h + v * V);
          odd += gr[u + 1] * load(w.w2 + (u + 1) * h + v * V);
        }
        gs += odd;
        const vf av = load(a + row * h + v * V), sig = sigmoid(av);
        store(ga[b] + v * V, gs * sig * (1.0f + av * (1.0f - sig)));
      }
      if (gq) {
        vf acc[4][dv] = {};
        for (int64_t j = 0; j < h; j += 4)
          for (int t = 0; t < 4; ++t)
            for (int u = 0; u < dv; ++u)
              acc[t][u] += ga[b][j + t] * load(w.w1 + (j + t) * d + u * V);
        for (int u = 0; u < dv; ++u)
          store(gq + row * d + u * V, (acc[0][u] + acc[1][u]) + (acc[2][u] + acc[3][u]));
      }
    }
    if (!gw1) continue;
    float *gb1 = gw1 + h * d, *gw2 = gb1 + h, *gb2 = gw2 + d * h;
    for (int64_t j = 0; j < h; ++j)  // gW1[j, :] += ga[j] q
      for (int u = 0; u < dv; ++u) {
        vf acc = load(gw1 + j * d + u * V);
        for (int b = 0; b < rows; ++b) acc += ga[b][j] * load(q + (r0 + b) * d + u * V);
        store(gw1 + j * d + u * V, acc);
      }
    for (int v = 0; v < hv; ++v) {  // gb1 += ga
      vf acc = load(gb1 + v * V);
      for (int b = 0; b < rows; ++b) acc += load(ga[b] + v * V);
      store(gb1 + v * V, acc);
    }
    for (int64_t u = 0; u < d; ++u)  // gW2[u, :] += g[u] s
      for (int v = 0; v < hv; ++v) {
        vf acc = load(gw2 + u * h + v * V);
        for (int b = 0; b < rows; ++b) acc += g[(r0 + b) * d + u] * load(s + (r0 + b) * h + v * V);
        store(gw2 + u * h + v * V, acc);
      }
    for (int u = 0; u < dv; ++u) {  // gb2 += g
      vf acc = load(gb2 + u * V);
      for (int b = 0; b < rows; ++b) acc += load(g + (r0 + b) * d + u * V);
      store(gb2 + u * V, acc);
    }
  }
}

template <int dv, int hv>
void forward_slots(const float* q, const float* flat, int64_t S, int64_t R, float* out, float* a,
                   float* s, int threads) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
#pragma omp parallel for num_threads(threads) schedule(static) if (R >= 512)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = i * R + r;
      forward_row<dv, hv>(w, q + row * d, out + row * d, a ? a + row * h : nullptr,
                          s ? s + row * h : nullptr);
    }
  }
}

template <int dv, int hv>
void backward_slots(const float* q, const float* flat, const float* a, const float* s,
                    const float* g, int64_t S, int64_t R, float* gq, float* gflat) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
    backward_slot<dv, hv>(w, q + i * R * d, a + i * R * h, s + i * R * h, g + i * R * d, R,
                          gq ? gq + i * R * d : nullptr, gflat ? gflat + i * n : nullptr);
  }
}

// The reference surprise sum_features mean_rows (M(q) - v)^2 of each slot (S) and its gradient
// with respect to the slot's flat weights (S, n): forward, error and backward in one pass.
template <int dv, int hv>
void recall_slots(const float* q, const float* values, const float* flat, int64_t S, int64_t R,
                  float* surprise, float* gflat, int threads) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  std::vector<float> a(R * h), s(R * h), g(R * d);
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
    const float *qi = q + i * R * d, *vi = values + i * R * d;
    forward_slots<dv, hv>(qi, flat + i * n, 1, R, g.data(), a.data(), s.data(), threads);
    vf total = vf{};
    for (int64_t e = 0; e < R * d; e += V) {  // g: the error, then d surprise / d M(q)
      const vf diff = load(g.data() + e) - load(vi + e);
      total += diff * diff;
      store(g.data() + e, diff * (2.0f / static_cast<float>(R)));
    }
    surprise[i] = hsum(total) / static_cast<float>(R);
    backward_slot<dv, hv>(w, qi, a.data(), s.data(), g.data(), R, nullptr, gflat + i * n);
  }
}

// Calls fn<dv, hv>(args...) for the supported widths: d in {16, 32}, h in {16, 32, 64}.
#define TITANS_DISPATCH(fn, d, h, ...)                       \
  switch ((d) / V * 8 + (h) / V) {                           \
    case 8 + 1: fn<1, 1>(__VA_ARGS__); return 1;             \
    case 8 + 2: fn<1, 2>(__VA_ARGS__); return 1;             \
    case 8 + 4: fn<1, 4>(__VA_ARGS__); return 1;             \
    case 16 + 1: fn<2, 1>(__VA_ARGS__); return 1;            \
    case 16 + 2: fn<2, 2>(__VA_ARGS__); return 1;            \
    case 16 + 4: fn<2, 4>(__VA_ARGS__); return 1;            \
    default: return 0;                                       \
  }

}  // namespace

extern "C" {

int titans_mlp_supported(int64_t d, int64_t h) {
  return d % V == 0 && h % V == 0 && (d == 16 || d == 32) && (h == 16 || h == 32 || h == 64);
}

// out (S, R, d) = M(q) for q (S, R, d); with a and s given (S, R, h), also the pre-activation
// and the activation the backward pass needs; rows split over up to `threads` threads when there
// are enough of them. Returns 0 for an unsupported width.
int titans_mlp_forward(const float* q, const float* flat, int64_t S, int64_t R, int64_t d,
                       int64_t h, float* out, float* a, float* s, int threads) {
  if (!titans_mlp_supported(d, h)) return 0;
  TITANS_DISPATCH(forward_slots, d, h, q, flat, S, R, out, a, s, threads < 1 ? 1 : threads)
}

// Given g = d loss / d out (S, R, d) and the forward's a, s: gq (S, R, d) when given, and the
// gradient of the flat weights, gflat (S, n), when given. Returns 0 for an unsupported width.
int titans_mlp_backward(const float* q, const float* flat, const float* a, const float* s,
                        const float* g, int64_t S, int64_t R, int64_t d, int64_t h, float* gq,
                        float* gflat) {
  if (!titans_mlp_supported(d, h)) return 0;
  TITANS_DISPATCH(backward_slots, d, h, q, flat, a, s, g, S, R, gq, gflat)
}

// surprise (S) = sum_features mean_rows (M(q) - values)^2 per slot, for q and values (S, R, d),
// and its gradient with respect to the flat weights, gflat (S, n). Returns 0 for an unsupported
// width.
int titans_mlp_recall(const float* q, const float* values, const float* flat, int64_t S,
                      int64_t R, int64_t d, int64_t h, float* surprise, float* gflat,
                      int threads) {
  if (!titans_mlp_supported(d, h)) return 0;
  TITANS_DISPATCH(recall_slots, d, h, q, values, flat, S, R, surprise, gflat,
                  threads < 1 ? 1 : threads)
}

}  // extern "C"
