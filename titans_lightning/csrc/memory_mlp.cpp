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

#include <memory>
#include <vector>

#include "status.h"
#include "vector.h"

namespace {

constexpr int B = 4;   // rows per weight load in the backward pass
constexpr int FB = 8;  // rows per weight load in the forward pass

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

// N rows: a = q W1^T + b1, s = silu(a), out = s W2^T + b2 (a and s also written when given).
// dv = d / V, hv = h / V and N are compile-time constants, so the N accumulators stay in
// registers; each weight vector is loaded once for the N rows.
template <int dv, int hv, int N>
void forward_rows(const Slot& w, const float* q, float* out, float* a_out, float* s_out,
                  float* sig_out = nullptr) {
  constexpr int64_t d = dv * V, h = hv * V;
  alignas(64) float s[N][hv * V];
  for (int v = 0; v < hv; ++v) {
    vf acc[N];
    for (int b = 0; b < N; ++b) acc[b] = load(w.b1 + v * V);
    for (int64_t k = 0; k < d; ++k) {
      const vf wv = load(w.w1t.data() + k * h + v * V);
      for (int b = 0; b < N; ++b) acc[b] += q[b * d + k] * wv;
    }
    for (int b = 0; b < N; ++b) {
      const vf sg = sigmoid(acc[b]), sv = acc[b] * sg;
      store(s[b] + v * V, sv);
      if (a_out) store(a_out + b * h + v * V, acc[b]);
      if (s_out) store(s_out + b * h + v * V, sv);
      if (sig_out) store(sig_out + b * h + v * V, sg);
    }
  }
  for (int u = 0; u < dv; ++u) {
    vf o[N];
    for (int b = 0; b < N; ++b) o[b] = load(w.b2 + u * V);
    for (int64_t j = 0; j < h; ++j) {
      const vf wv = load(w.w2t.data() + j * d + u * V);
      for (int b = 0; b < N; ++b) o[b] += s[b][j] * wv;
    }
    for (int b = 0; b < N; ++b) store(out + b * d + u * V, o[b]);
  }
}

// out (m, cv * V) = x^T y over R rows, for x (R, m) and y (R, cv * V): 16 rows of out at a time
// in 16 vector accumulators, one load of y per row and vector.
template <int cv, int64_t m>
void outer_sum(const float* x, const float* y, int64_t R, float* out) {
  constexpr int64_t c = cv * V;
  for (int64_t i0 = 0; i0 < m; i0 += V)
    for (int v = 0; v < cv; ++v) {
      vf acc[V] = {};
      for (int64_t r = 0; r < R; ++r) {
        const vf yv = load(y + r * c + v * V);
        const float* xr = x + r * m + i0;
        for (int t = 0; t < V; ++t) acc[t] += xr[t] * yv;
      }
      for (int t = 0; t < V; ++t) store(out + (i0 + t) * c + v * V, acc[t]);
    }
}

// out (cv * V) = the sum over R rows of x (R, cv * V).
template <int cv>
void column_sum(const float* x, int64_t R, float* out) {
  for (int v = 0; v < cv; ++v) {
    vf acc = vf{}, odd = vf{};
    int64_t r = 0;
    for (; r + 1 < R; r += 2) {
      acc += load(x + r * cv * V + v * V);
      odd += load(x + (r + 1) * cv * V + v * V);
    }
    if (r < R) acc += load(x + r * cv * V + v * V);
    store(out + v * V, acc + odd);
  }
}

// ga = (g W2) * silu'(a) and, when gq is given, gq = ga W1 for N rows; sigmoid(a) is read from
// sig when given (the forward pass kept it), else computed.
template <int dv, int hv, int N>
void backward_rows(const Slot& w, const float* a, const float* sig, const float* g, float* ga,
                   float* gq) {
  constexpr int64_t d = dv * V, h = hv * V;
  for (int v = 0; v < hv; ++v) {
    vf gs[N] = {};
    for (int64_t u = 0; u < d; ++u) {
      const vf wv = load(w.w2 + u * h + v * V);
      for (int b = 0; b < N; ++b) gs[b] += g[b * d + u] * wv;
    }
    for (int b = 0; b < N; ++b) {
      const vf av = load(a + b * h + v * V);
      const vf sg = sig ? load(sig + b * h + v * V) : sigmoid(av);
      store(ga + b * h + v * V, gs[b] * sg * (1.0f + av * (1.0f - sg)));
    }
  }
  if (!gq) return;
  for (int u = 0; u < dv; ++u) {
    vf acc[N] = {};
    for (int64_t j = 0; j < h; ++j) {
      const vf wv = load(w.w1 + j * d + u * V);
      for (int b = 0; b < N; ++b) acc[b] += ga[b * h + j] * wv;
    }
    for (int b = 0; b < N; ++b) store(gq + b * d + u * V, acc[b]);
  }
}

// ga for rows r0 .. r1, in blocks of B rows.
template <int dv, int hv>
void backward_rows_range(const Slot& w, const float* a, const float* sig, const float* g,
                         float* ga, int64_t r0, int64_t r1) {
  constexpr int64_t d = dv * V, h = hv * V;
  int64_t r = r0;
  for (; r + B <= r1; r += B)
    backward_rows<dv, hv, B>(w, a + r * h, sig ? sig + r * h : nullptr, g + r * d, ga + r * h,
                             nullptr);
  for (; r < r1; ++r)
    backward_rows<dv, hv, 1>(w, a + r * h, sig ? sig + r * h : nullptr, g + r * d, ga + r * h,
                             nullptr);
}

// The backward pass of one slot: gq (R, d) when given, gflat (n) when given. ga (R, h) is
// scratch for the gradient at the pre-activation; sig as in backward_rows.
template <int dv, int hv>
void backward_slot(const Slot& w, const float* q, const float* a, const float* s,
                   const float* sig, const float* g, int64_t R, float* gq, float* gflat,
                   float* ga) {
  constexpr int64_t d = dv * V, h = hv * V;
  int64_t r = 0;
  for (; r + B <= R; r += B)
    backward_rows<dv, hv, B>(w, a + r * h, sig ? sig + r * h : nullptr, g + r * d, ga + r * h,
                             gq ? gq + r * d : nullptr);
  for (; r < R; ++r)
    backward_rows<dv, hv, 1>(w, a + r * h, sig ? sig + r * h : nullptr, g + r * d, ga + r * h,
                             gq ? gq + r * d : nullptr);
  if (!gflat) return;
  float *gw1 = gflat, *gb1 = gw1 + h * d, *gw2 = gb1 + h, *gb2 = gw2 + d * h;
  outer_sum<dv, h>(ga, q, R, gw1);  // gW1 (h, d) = ga^T q
  outer_sum<hv, d>(g, s, R, gw2);   // gW2 (d, h) = g^T s
  column_sum<hv>(ga, R, gb1);
  column_sum<dv>(g, R, gb2);
}

template <int dv, int hv>
void forward_slots(const float* q, const float* flat, int64_t S, int64_t R, float* out, float* a,
                   float* s, int threads) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
#pragma omp parallel for num_threads(threads) schedule(static) if (R >= 512)
    for (int64_t r0 = 0; r0 < R; r0 += FB) {
      const int64_t row = i * R + r0;
      float *a_out = a ? a + row * h : nullptr, *s_out = s ? s + row * h : nullptr;
      if (r0 + FB <= R) {
        forward_rows<dv, hv, FB>(w, q + row * d, out + row * d, a_out, s_out);
      } else {
        for (int64_t r = 0; r < R - r0; ++r)
          forward_rows<dv, hv, 1>(w, q + (row + r) * d, out + (row + r) * d,
                                  a_out ? a_out + r * h : nullptr, s_out ? s_out + r * h : nullptr);
      }
    }
  }
}

template <int dv, int hv>
void backward_slots(const float* q, const float* flat, const float* a, const float* s,
                    const float* g, int64_t S, int64_t R, float* gq, float* gflat) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  std::vector<float> ga(R * h);
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
    backward_slot<dv, hv>(w, q + i * R * d, a + i * R * h, s + i * R * h, nullptr,
                          g + i * R * d, R, gq ? gq + i * R * d : nullptr,
                          gflat ? gflat + i * n : nullptr, ga.data());
  }
}

// The reference surprise sum_features mean_rows (M(q) - v)^2 of each slot (S) and its gradient
// with respect to the slot's flat weights (S, n): forward, error and backward in one pass.
template <int dv, int hv>
void surprise_and_gradient_slots(const float* q, const float* values, const float* flat,
                                 int64_t S, int64_t R, float* surprise, float* gflat,
                                 int threads) {
  constexpr int64_t d = dv * V, h = hv * V, n = 2 * h * d + h + d;
  std::unique_ptr<float[]> a(new float[R * h]), s(new float[R * h]), sig(new float[R * h]),
      g(new float[R * d]), ga(new float[R * h]);
  const int64_t blocks = (R + FB - 1) / FB;
  std::unique_ptr<float[]> partial(new float[blocks]);  // each block's sum of squared errors
  for (int64_t i = 0; i < S; ++i) {
    const Slot w(flat + i * n, d, h);
    const float *qi = q + i * R * d, *vi = values + i * R * d;
    float* gi = gflat + i * n;
    // rows split over the threads; the two weight gradients, one per thread
#pragma omp parallel num_threads(threads) if (R >= 512)
    {
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r0 = blk * FB, r1 = r0 + FB < R ? r0 + FB : R;
        if (r1 - r0 == FB) {
          forward_rows<dv, hv, FB>(w, qi + r0 * d, g.get() + r0 * d, a.get() + r0 * h,
                                   s.get() + r0 * h, sig.get() + r0 * h);
        } else {
          for (int64_t r = r0; r < r1; ++r)
            forward_rows<dv, hv, 1>(w, qi + r * d, g.get() + r * d, a.get() + r * h,
                                    s.get() + r * h, sig.get() + r * h);
        }
        vf part = vf{};  // g: the error, then d surprise / d M(q)
        for (int64_t e = r0 * d; e < r1 * d; e += V) {
          const vf diff = load(g.get() + e) - load(vi + e);
          part += diff * diff;
          store(g.get() + e, diff * (2.0f / static_cast<float>(R)));
        }
        partial[blk] = hsum(part);
        backward_rows_range<dv, hv>(w, a.get(), sig.get(), g.get(), ga.get(), r0, r1);
      }
#pragma omp sections
      {
#pragma omp section
        {
          outer_sum<dv, h>(ga.get(), qi, R, gi);  // gW1 (h, d) = ga^T q
          column_sum<hv>(ga.get(), R, gi + h * d);
        }
#pragma omp section
        {
          outer_sum<hv, d>(g.get(), s.get(), R, gi + h * d + h);  // gW2 (d, h) = g^T s
          column_sum<dv>(g.get(), R, gi + 2 * h * d + h);
        }
      }
    }
    float total = 0.0f;  // summed in block order: the same on any number of threads
    for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk];
    surprise[i] = total / static_cast<float>(R);
  }
}

// Calls fn<dv, hv>(args...) for the supported widths, d in {16, 32} and h in {16, 32, 64}, and
// returns kOk; kUnsupportedSize for any other width.
#define TITANS_DISPATCH(fn, d, h, ...)                       \
  if ((d) % V || (h) % V) return kUnsupportedSize;           \
  switch ((d) / V * 8 + (h) / V) {                           \
    case 8 + 1: fn<1, 1>(__VA_ARGS__); return kOk;           \
    case 8 + 2: fn<1, 2>(__VA_ARGS__); return kOk;           \
    case 8 + 4: fn<1, 4>(__VA_ARGS__); return kOk;           \
    case 16 + 1: fn<2, 1>(__VA_ARGS__); return kOk;          \
    case 16 + 2: fn<2, 2>(__VA_ARGS__); return kOk;          \
    case 16 + 4: fn<2, 4>(__VA_ARGS__); return kOk;          \
    default: return kUnsupportedSize;                        \
  }

}  // namespace

extern "C" {

// out (S, R, d) = M(q) for q (S, R, d); with a and s given (S, R, h), also the pre-activation
// and the activation the backward pass needs; rows split over up to `threads` threads when there
// are enough of them.
int titans_mlp_forward(const float* q, const float* flat, int64_t S, int64_t R, int64_t d,
                       int64_t h, float* out, float* a, float* s, int threads) {
  if (S < 0 || R < 0) return kUnsupportedSize;
  return guarded([&] {
    TITANS_DISPATCH(forward_slots, d, h, q, flat, S, R, out, a, s, threads < 1 ? 1 : threads)
  });
}

// Given g = d loss / d out (S, R, d) and the forward's a, s: gq (S, R, d) when given, and the
// gradient of the flat weights, gflat (S, n), when given.
int titans_mlp_backward(const float* q, const float* flat, const float* a, const float* s,
                        const float* g, int64_t S, int64_t R, int64_t d, int64_t h, float* gq,
                        float* gflat) {
  if (S < 0 || R < 0) return kUnsupportedSize;
  return guarded([&] { TITANS_DISPATCH(backward_slots, d, h, q, flat, a, s, g, S, R, gq, gflat) });
}

// surprise (S) = sum_features mean_rows (M(q) - values)^2 per slot, for q and values (S, R, d),
// and its gradient with respect to the flat weights, gflat (S, n); from 512 rows on, on up to
// `threads` threads. R must be at least 1 (a mean over rows).
int titans_mlp_surprise_and_gradient(const float* q, const float* values, const float* flat,
                                     int64_t S, int64_t R, int64_t d, int64_t h, float* surprise,
                                     float* gflat, int threads) {
  if (S < 0 || R < 1) return kUnsupportedSize;
  return guarded([&] {
    TITANS_DISPATCH(surprise_and_gradient_slots, d, h, q, values, flat, S, R, surprise, gflat,
                    threads < 1 ? 1 : threads)
  });
}

// The harness's check of one update: ok[i] = 1 when slot i's surprise (one value), gradient and
// new weights (n each) are all finite; weights[i] = new[i] where ok, else old[i]; updates += 1,
// skipped += the number of slots not ok.
int titans_memory_commit(const float* surprise, const float* grads, const float* fresh,
                         const float* old, int64_t S, int64_t n, float* weights, bool* ok,
                         int64_t* updates, int64_t* skipped) {
  if (S < 0 || n < 0) return kUnsupportedSize;
  for (int64_t i = 0; i < S; ++i) {
    float zero = surprise[i] * 0.0f;  // 0 for finite x, NaN for inf and NaN
    for (int64_t e = 0; e < n; ++e) zero += grads[i * n + e] * 0.0f + fresh[i * n + e] * 0.0f;
    ok[i] = zero == 0.0f;
    std::memcpy(weights + i * n, (ok[i] ? fresh : old) + i * n, sizeof(float) * n);
    *skipped += !ok[i];
  }
  *updates += 1;
  return kOk;
}

// The Titans rule's step (titans_default's apply_update, Eqs. 13-14) and the harness's check, in
// one pass: per slot i, m' = eta m - theta g and w' = alpha w + m' (each product and sum rounded
// to float, as PyTorch's operators round them); ok[i] = 1 when the surprise, g, w' and m' are
// all finite; weights[i], momentum_out[i] = (w', m') where ok, else (old, momentum). No fused
// multiply-add: it would round differently from the rule's PyTorch operators.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int titans_momentum_step(const float* surprise, const float* grads, const float* old,
                         const float* momentum, int64_t S, int64_t n, float alpha, float eta,
                         float theta, float* weights, float* momentum_out, bool* ok,
                         int64_t* updates, int64_t* skipped) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  if (S < 0 || n < 0) return kUnsupportedSize;
  for (int64_t i = 0; i < S; ++i) {
    const float *g = grads + i * n, *w = old + i * n, *m = momentum + i * n;
    float *w_out = weights + i * n, *m_out = momentum_out + i * n;
    float zero = surprise[i] * 0.0f;  // 0 for finite x, NaN for inf and NaN
    for (int64_t e = 0; e < n; ++e) {
      const float kept = eta * m[e], step = theta * g[e];
      const float m_new = kept - step, retained = alpha * w[e];
      m_out[e] = m_new;
      w_out[e] = retained + m_new;
      zero += g[e] * 0.0f + w_out[e] * 0.0f + m_new * 0.0f;
    }
    ok[i] = zero == 0.0f;
    if (!ok[i]) {
      std::memcpy(w_out, w, sizeof(float) * n);
      std::memcpy(m_out, m, sizeof(float) * n);
    }
    *skipped += !ok[i];
  }
  *updates += 1;
  return kOk;
}

}  // extern "C"
