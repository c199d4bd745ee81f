// The MAC encoder layer's feed-forward, fused, for the CPU:
//
//     out = b2 + dropout(silu(x @ w1.T + b1)) @ w2.T        x: (M, D) rows, hidden width f
//
// The (M, f) hidden activation is never written to memory: each 16-wide slice of it lives in
// registers between the two matrix products, and the backward pass recomputes it. Dropout keeps
// hidden element (r, j) unless hash(seed, r, j) < threshold, a counter-based draw; the forward
// pass leaves its decisions as bits (16 per int16) for the backward pass.
//
// Shape legend: M rows, D = 16 row width, f hidden width (a multiple of 16), V = 16 lanes.
// Built by titans_lightning/kernels/build.py with the machine's own vector instructions; plain
// C++ with GCC/Clang vector types and OpenMP, no other library.

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "status.h"
#include "vector.h"

namespace {

constexpr int D = 16;          // row width (the model's hidden_dim)
constexpr int R = 16;          // rows per register block
constexpr int64_t JB = 256;    // hidden units per cache block (weights of a block stay in L1)
constexpr int MAX_THREADS = 64;

struct Problem {
  const float *x, *g;                    // (M, D) inputs and, backward, output gradients
  const float *w1, *w1t, *b1, *w2, *w2t, *b2;  // (f, D), (D, f), (f), (D, f), (f, D), (D)
  float *out, *gx;                       // (M, D)
  float *gw1t, *gb1, *gw2;               // per-thread partial sums, (T, D, f) (T, f) (T, D, f)
  int64_t M, f;
  uint64_t seed;
  uint32_t threshold;                    // drop when hash < threshold; 0 means no dropout
  uint16_t* bits;                        // (M, f / V) keep bits the forward pass leaves for
                                         // the backward pass (null: draw them again)
  float scale;                           // 1 / (1 - p)
  const float *norm_w, *norm_b;          // (D) each: out = LayerNorm(x + out) after the sum
  float eps;                             //   (null: no layer norm)
};

// A lane mask (all ones = kept) as 16 bits, and back.
inline uint16_t to_bits(vu keep) {
#if defined(__AVX512F__)
  return static_cast<uint16_t>(_mm512_movepi32_mask((__m512i)keep));
#else
  uint16_t bits = 0;
  for (int l = 0; l < V; ++l) bits |= static_cast<uint16_t>((keep[l] & 1u) << l);
  return bits;
#endif
}

inline vu from_bits(uint16_t bits) {
#if defined(__AVX512F__)
  return (vu)_mm512_movm_epi32(bits);
#else
  vu keep;
  for (int l = 0; l < V; ++l) keep[l] = (bits >> l) & 1u ? ~0u : 0u;
  return keep;
#endif
}

// a[i] = b1 + x_i @ w1.T for hidden units j..j+V of N rows (each weight vector loaded once).
template <int N>
inline void pre_activations(const Problem& P, const float* x, int64_t j, vf* a) {
  const vf b = load(P.b1 + j);
  for (int i = 0; i < N; ++i) a[i] = b;
  for (int k = 0; k < D; ++k) {
    const vf w = load(P.w1t + k * P.f + j);
    for (int i = 0; i < N; ++i) a[i] += x[i * D + k] * w;
  }
}

// One register block: N rows starting at rb, hidden units j0..j1, accumulated into out.
template <int N>
void forward_block(const Problem& P, int64_t rb, int64_t j0, int64_t j1) {
  alignas(64) float sd[N][V];  // the dropped, scaled activations
  const float* x = P.x + rb * D;
  vf acc[N], a[N];
  uint32_t key[N];
  for (int i = 0; i < N; ++i) {
    acc[i] = load(P.out + (rb + i) * D);
    key[i] = row_key(P.seed, rb + i);
  }
  for (int64_t j = j0; j < j1; j += V) {
    pre_activations<N>(P, x, j, a);
    for (int i = 0; i < N; ++i) {
      vf s = a[i] * sigmoid(a[i]);
      if (P.threshold) {
        const vu keep = keep_lanes(key[i], j, P.threshold);
        if (P.bits) P.bits[(rb + i) * (P.f / V) + j / V] = to_bits(keep);
        s = keep ? s * P.scale : vf{};
      }
      store(sd[i], s);
    }
    for (int jj = 0; jj < V; ++jj) {
      const vf w = load(P.w2t + (j + jj) * D);
      for (int i = 0; i < N; ++i) acc[i] += sd[i][jj] * w;
    }
  }
  for (int i = 0; i < N; ++i) store(P.out + (rb + i) * D, acc[i]);
}

template <int N>
void backward_block(const Problem& P, int64_t rb, int64_t j0, int64_t j1, float* gw1t, float* gb1,
                    float* gw2) {
  alignas(64) float da_lanes[N][V];
  const float* x = P.x + rb * D;
  const float* g = P.g + rb * D;
  vf a[N], ds[N];
  uint32_t key[N];
  for (int i = 0; i < N; ++i) key[i] = row_key(P.seed, rb + i);
  for (int64_t j = j0; j < j1; j += V) {
    pre_activations<N>(P, x, j, a);
    for (int i = 0; i < N; ++i) ds[i] = vf{};  // gradient reaching the dropped activation
    for (int k = 0; k < D; ++k) {
      const vf w = load(P.w2 + k * P.f + j);
      for (int i = 0; i < N; ++i) ds[i] += g[i * D + k] * w;
    }
    vf gb = load(gb1 + j);
    for (int i = 0; i < N; ++i) {  // a[i] becomes the activation, ds[i] the pre-activation grad
      const vf sig = sigmoid(a[i]);
      vf s = a[i] * sig;
      vf d = ds[i] * sig * (1.0f + a[i] * (1.0f - sig));  // through silu
      if (P.threshold) {
        const vu keep = P.bits ? from_bits(P.bits[(rb + i) * (P.f / V) + j / V])
                               : keep_lanes(key[i], j, P.threshold);
        s = keep ? s * P.scale : vf{};
        d = keep ? d * P.scale : vf{};
      }
      a[i] = s;
      ds[i] = d;
      store(da_lanes[i], d);
      gb += d;
    }
    store(gb1 + j, gb);
    for (int k = 0; k < D; ++k) {
      vf w2acc = load(gw2 + k * P.f + j), w1acc = load(gw1t + k * P.f + j);
      for (int i = 0; i < N; ++i) {
        w2acc += g[i * D + k] * a[i];
        w1acc += x[i * D + k] * ds[i];
      }
      store(gw2 + k * P.f + j, w2acc);
      store(gw1t + k * P.f + j, w1acc);
    }
    vf gx[N];  // through memory: kept in registers across j they would crowd out a and ds
    for (int i = 0; i < N; ++i) gx[i] = load(P.gx + (rb + i) * D);
    for (int jj = 0; jj < V; ++jj) {
      const vf w = load(P.w1 + (j + jj) * D);
      for (int i = 0; i < N; ++i) gx[i] += da_lanes[i][jj] * w;
    }
    for (int i = 0; i < N; ++i) store(P.gx + (rb + i) * D, gx[i]);
  }
}

// Block<n>::run for a block of n < N rows (n known only at run time).
template <template <int> class Block, int N, typename... Args>
void run_partial(int n, int64_t rb, Args... args) {
  if constexpr (N > 1) {
    if (n == N - 1) Block<N - 1>::run(rb, args...);
    else run_partial<Block, N - 1>(n, rb, args...);
  }
}

// Calls Block<R>::run for each full block of R rows, then once for the remaining rows.
template <template <int> class Block, typename... Args>
void over_blocks(int64_t r0, int64_t r1, Args... args) {
  int64_t rb = r0;
  for (; rb + R <= r1; rb += R) Block<R>::run(rb, args...);
  if (rb < r1) run_partial<Block, R>(static_cast<int>(r1 - rb), rb, args...);
}

template <int N>
struct Forward {
  static void run(int64_t rb, const Problem* P, int64_t j0, int64_t j1) {
    forward_block<N>(*P, rb, j0, j1);
  }
};

template <int N>
struct Backward {
  static void run(int64_t rb, const Problem* P, int64_t j0, int64_t j1, float* gw1t,
                  float* gb1, float* gw2) {
    backward_block<N>(*P, rb, j0, j1, gw1t, gb1, gw2);
  }
};

void forward_rows(const Problem& P, int64_t r0, int64_t r1, int /*tid*/) {
  for (int64_t r = r0; r < r1; ++r) store(P.out + r * D, load(P.b2));
  for (int64_t j0 = 0; j0 < P.f; j0 += JB) {
    const int64_t j1 = j0 + JB < P.f ? j0 + JB : P.f;
    over_blocks<Forward>(r0, r1, &P, j0, j1);
  }
  if (P.norm_w) {  // the encoder layer's residual connection and post-norm
    const vf w = load(P.norm_w), b = load(P.norm_b);
    for (int64_t r = r0; r < r1; ++r)
      store(P.out + r * D, layer_norm(load(P.x + r * D) + load(P.out + r * D), w, b, P.eps));
  }
}

void backward_rows(const Problem& P, int64_t r0, int64_t r1, int tid) {
  float* gw1t = P.gw1t + tid * D * P.f;
  float* gw2 = P.gw2 + tid * D * P.f;
  float* gb1 = P.gb1 + tid * P.f;
  for (int64_t r = r0; r < r1; ++r) store(P.gx + r * D, vf{});
  for (int64_t j0 = 0; j0 < P.f; j0 += JB) {
    const int64_t j1 = j0 + JB < P.f ? j0 + JB : P.f;
    over_blocks<Backward>(r0, r1, &P, j0, j1, gw1t, gb1, gw2);
  }
}

// Runs fn over the rows in chunks that up to `threads` threads of the OpenMP pool (the one
// PyTorch's own CPU operators use, so the two never compete for cores) take as they come: a
// thread that wakes late does less, instead of making the others wait for its fixed share.
// Returns how many thread slots fn may have used.
int parallel_rows(void (*fn)(const Problem&, int64_t, int64_t, int), const Problem& P,
                  int threads) {
  constexpr int64_t CHUNK = 4 * R;
  int T = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
  if (P.M < 2 * CHUNK) T = 1;
#if defined(_OPENMP)
  if (T > 1) {
    const int64_t chunks = (P.M + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r1 = (c + 1) * CHUNK < P.M ? (c + 1) * CHUNK : P.M;
      fn(P, c * CHUNK, r1, omp_get_thread_num());
    }
    return T;
  }
#endif
  fn(P, 0, P.M, 0);
  return 1;
}

// dst (cols, rows) = src (rows, cols) transposed, in 16 x 16 tiles: writing a column of a
// (2048, 16) matrix element by element touches a new cache line (and page) at every step.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t T = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += T) {
    const int64_t r1 = r0 + T < rows ? r0 + T : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += T) {
      const int64_t c1 = c0 + T < cols ? c0 + T : cols;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  }
}

}  // namespace

extern "C" {

// The dropout decisions the kernels make for an (M, f) matrix (the feed-forward's activation,
// or the attention weights as (windows * heads * L, L)), as 0/1 bytes: for tests and inspection.
int titans_dropout_keep(uint64_t seed, uint32_t threshold, int64_t M, int64_t f,
                        uint8_t* keep) {
  if (M < 0 || f < 0) return kUnsupportedSize;
  for (int64_t r = 0; r < M; ++r) {
    const uint32_t key = row_key(seed, r);
    for (int64_t j = 0; j < f; j += V) {
      const vu k = keep_lanes(key, j, threshold);
      for (int l = 0; l < V && j + l < f; ++l) keep[r * f + j + l] = k[l] ? 1 : 0;
    }
  }
  return kOk;
}

// out (M, V) = dropout(x) for rows x (M, V): row r keeps lane j unless hash(seed, r, j) <
// threshold (the draws of titans_dropout_keep with f = V), and scales what it keeps. The same
// call with the same seed is the backward pass, applied to the gradient.
int titans_dropout_apply(const float* x, int64_t M, uint64_t seed, uint32_t threshold,
                         float scale, float* out, int threads) {
  if (M < 0) return kUnsupportedSize;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) if (M >= 1024)
  for (int64_t r = 0; r < M; ++r) {
    const vu keep = keep_lanes(row_key(seed, r), 0, threshold);
    store(out + r * V, keep ? load(x + r * V) * scale : vf{});
  }
  return kOk;
}

// out (M, D) = b2 + dropout(silu(x @ w1.T + b1)) @ w2.T, with w1 (f, D) and w2 (D, f) as
// nn.Linear keeps them. With dropout and `bits` given, the keep decisions are left there for
// the backward pass. With norm_w and norm_b given, out = LayerNorm(x + that) instead (forward
// only). f must be a positive multiple of V.
int titans_ffn_forward(const float* x, int64_t M, const float* w1, const float* b1,
                       const float* w2, const float* b2, int64_t f, uint64_t seed,
                       uint32_t threshold, float scale, uint16_t* bits, float* out, int threads,
                       const float* norm_w, const float* norm_b, float eps) {
  if (M < 0 || f <= 0 || f % V) return kUnsupportedSize;
  float* w1t = static_cast<float*>(std::malloc(sizeof(float) * 2 * D * f));
  if (!w1t) return kOutOfMemory;
  float* w2t = w1t + D * f;
  transpose(w1, f, D, w1t);
  transpose(w2, D, f, w2t);
  Problem P{};
  P.bits = bits;
  P.x = x; P.w1t = w1t; P.b1 = b1; P.w2t = w2t; P.b2 = b2; P.out = out;
  P.M = M; P.f = f; P.seed = seed; P.threshold = threshold; P.scale = scale;
  P.norm_w = norm_w; P.norm_b = norm_b; P.eps = eps;
  parallel_rows(forward_rows, P, threads);
  std::free(w1t);
  return kOk;
}

// Gradients of the forward above given g = d loss / d out (M, D) and the forward's keep bits
// (or null: drawn again from the seed): gx (M, D), gw1 (f, D), gb1 (f), gw2 (D, f); gb2 is g
// summed over rows, left to the caller. f must be a positive multiple of V.
int titans_ffn_backward(const float* x, int64_t M, const float* w1, const float* b1,
                        const float* w2, int64_t f, const float* g, uint64_t seed,
                        uint32_t threshold, const uint16_t* bits, float scale, float* gx,
                        float* gw1, float* gb1, float* gw2, int threads) {
  if (M < 0 || f <= 0 || f % V) return kUnsupportedSize;
  const int T = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
  const int64_t per_thread = 2 * D * f + f;  // each thread's partial gw1t, gw2, gb1
  float* scratch = static_cast<float*>(
      std::calloc(static_cast<size_t>(D * f + T * per_thread), sizeof(float)));
  if (!scratch) return kOutOfMemory;
  Problem P{};
  P.bits = const_cast<uint16_t*>(bits);
  P.x = x; P.g = g; P.w1 = w1; P.b1 = b1; P.w2 = w2; P.gx = gx;
  P.M = M; P.f = f; P.seed = seed; P.threshold = threshold; P.scale = scale;
  float* w1t = scratch;
  transpose(w1, f, D, w1t);
  P.w1t = w1t;
  P.gw1t = scratch + D * f;
  P.gw2 = P.gw1t + T * D * f;
  P.gb1 = P.gw2 + T * D * f;
  const int used = parallel_rows(backward_rows, P, T);
  for (int t = 1; t < used; ++t) {
    for (int64_t i = 0; i < D * f; ++i) {
      P.gw1t[i] += P.gw1t[t * D * f + i];
      P.gw2[i] += P.gw2[t * D * f + i];
    }
    for (int64_t i = 0; i < f; ++i) P.gb1[i] += P.gb1[t * f + i];
  }
  transpose(P.gw1t, D, f, gw1);
  std::memcpy(gw2, P.gw2, sizeof(float) * D * f);
  std::memcpy(gb1, P.gb1, sizeof(float) * f);
  std::free(scratch);
  return kOk;
}

}  // extern "C"
