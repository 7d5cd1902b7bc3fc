// Fused CPU selective scan (Mamba, Gu & Dao 2023, eq. 2a-2b with the eq. 4 discretisation).
// Built and loaded by advarch/models/blocks/selective_scan_cpu.py through
// torch.utils.cpp_extension; the entry points are plain C (ctypes), no torch or Python headers.
// See that module's docstring for the algorithm, memory layout and work split.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <omp.h>

namespace {

constexpr int64_t kChunk = 64;

template <typename T>
struct Args {
  const T *u, *delta, *A, *B, *C, *D, *z;  // z may be null (no gate)
  int64_t batch, length, inner, state, chunks;
};

// exp for SIMD loops, inlined so the compiler vectorises it with no library call: x = k ln2 + r
// with |r| <= ln2/2, exp(r) by its Taylor polynomial (float: degree 6, double: 13; truncation
// about one ulp), 2^k from the exponent bits. x is clamped to the normal range first, so
// exp(x < lo) returns exp(lo) (~1e-38 float, ~1e-308 double) instead of 0.
template <typename T> struct ExpTraits;
template <> struct ExpTraits<float> {
  using Int = int32_t;
  static constexpr int degree = 6, mantissa = 23, bias = 127;
  static constexpr float lo = -87.0f, hi = 88.0f;
};
template <> struct ExpTraits<double> {
  using Int = int64_t;
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
  static constexpr double lo = -708.0, hi = 709.0;
};

template <typename T>
constexpr T inverse_factorial(int i) { return i == 0 ? T(1) : inverse_factorial<T>(i - 1) / T(i); }

template <typename T, int... I>
inline T taylor_exp(T r, std::integer_sequence<int, I...>) {
  constexpr T coef[] = {inverse_factorial<T>(ExpTraits<T>::degree - I)...};  // highest first
  T poly = coef[0];
  for (size_t i = 1; i < sizeof...(I); ++i) poly = poly * r + coef[i];  // Horner
  return poly;
}

template <typename T>
inline T fast_exp(T x) {
  using X = ExpTraits<T>;
  x = std::min(std::max(x, X::lo), X::hi);
  const T k = std::floor(x * T(1.4426950408889634) + T(0.5));
  const T r = x - k * T(0.6931471805599453);
  const typename X::Int bits = (static_cast<typename X::Int>(k) + X::bias) << X::mantissa;
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(T));
  return taylor_exp(r, std::make_integer_sequence<int, X::degree + 1>{}) * scale;
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + fast_exp(-x)); }

// Work split: channels are cut into blocks of W lanes (plus single-lane tail blocks when
// W does not divide E); the blocks of one batch row are cut into `groups` contiguous groups so
// that there are at least as many (row, group) items as threads. Each item walks time chunk by
// chunk and, inside a chunk, block by block: the rows of u, Δ, y read in one chunk are
// contiguous, so memory is streamed rather than strided by E.
struct Layout {
  int64_t full, blocks, groups, per_group;
  Layout(int64_t batch, int64_t inner, int width, int threads) {
    full = inner / width;
    blocks = full + inner % width;
    groups = std::min(blocks, std::max<int64_t>(1, (threads + batch - 1) / batch));
    per_group = (blocks + groups - 1) / groups;
  }
  int64_t first(int64_t item) const { return item % groups * per_group; }
  int64_t last(int64_t item) const { return std::min(blocks, first(item) + per_group); }
  int64_t e0(int64_t block, int width) const {
    return block < full ? block * width : full * width + (block - full);
  }
};

// Forward over steps [t0, t1) for channels e0..e0+W-1 of row b; h (N*W) carries the state.
template <typename T, int W>
void forward_chunk(const Args<T>& p, int64_t b, int64_t e0, int64_t t0, int64_t t1, T* y,
                   T* ckpt, T* h, T* At) {
  const int64_t L = p.length, E = p.inner, N = p.state;
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) At[n * W + l] = p.A[(e0 + l) * N + n];
  if (ckpt) {
    T* dst = ckpt + (b * p.chunks + t0 / kChunk) * N * E + e0;
    for (int64_t n = 0; n < N; ++n)
      for (int l = 0; l < W; ++l) dst[n * E + l] = h[n * W + l];
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = (b * L + t) * E + e0;
    const T* Bt = p.B + (b * L + t) * N;
    const T* Ct = p.C + (b * L + t) * N;
    T d[W], x[W], dx[W], acc[W];
    for (int l = 0; l < W; ++l) {
      d[l] = p.delta[row + l]; x[l] = p.u[row + l]; dx[l] = d[l] * x[l]; acc[l] = T(0);
    }
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      T* hn = h + n * W;
      const T* an = At + n * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const T hv = fast_exp(d[l] * an[l]) * hn[l] + dx[l] * bn;
        hn[l] = hv;
        acc[l] += cn * hv;
      }
    }
    for (int l = 0; l < W; ++l) {
      T out = acc[l] + p.D[e0 + l] * x[l];
      if (p.z) { const T zz = p.z[row + l]; out *= zz * sigmoid(zz); }
      y[row + l] = out;
    }
  }
}

template <typename T>
struct Grads {
  const T *ckpt, *gy;
  T *du, *ddelta, *dz;  // per element, written directly
  T *dA, *dB, *dC, *dD;  // reductions, accumulated from per-thread buffers
};

// Per-thread accumulators: dB, dC for batch rows from b_first on, dA (E, N), dD (E).
template <typename T>
struct Partial {
  int64_t b_first;
  std::vector<T> dB, dC, dA, dD;
};

// Backward over steps [t0, t1) for channels e0..e0+W-1 of row b, in reverse time. dh (N*W)
// carries dL/dh across chunks; hs, as, At, dAt are scratch for the recomputed chunk.
template <typename T, int W>
void backward_chunk(const Args<T>& p, const Grads<T>& g, int64_t b, int64_t e0, int64_t t0,
                    int64_t t1, T* dh, T* hs, T* as, T* At, T* dAt, Partial<T>& part) {
  const int64_t L = p.length, E = p.inner, N = p.state;
  const T* src = g.ckpt + (b * p.chunks + t0 / kChunk) * N * E + e0;
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) {
      At[n * W + l] = p.A[(e0 + l) * N + n];
      hs[n * W + l] = src[n * E + l];
      dAt[n * W + l] = T(0);
    }
  for (int64_t t = t0; t < t1; ++t) {  // recompute the chunk: hs[k+1] = h_t, as[k] = a_t
    const int64_t k = t - t0, row = (b * L + t) * E + e0;
    const T* Bt = p.B + (b * L + t) * N;
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n];
      const T *hp = hs + (k * N + n) * W, *an = At + n * W;
      T *hn = hs + ((k + 1) * N + n) * W, *ak = as + (k * N + n) * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const T d = p.delta[row + l];
        ak[l] = fast_exp(d * an[l]);
        hn[l] = ak[l] * hp[l] + d * p.u[row + l] * bn;
      }
    }
  }
  T* dB_rows = part.dB.data() + (b - part.b_first) * L * N;
  T* dC_rows = part.dC.data() + (b - part.b_first) * L * N;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t k = t - t0, row = (b * L + t) * E + e0;
    const T* Bt = p.B + (b * L + t) * N;
    const T* Ct = p.C + (b * L + t) * N;
    T d[W], x[W], dx[W], gy[W], ddx[W], ddel[W];
    for (int l = 0; l < W; ++l) {
      d[l] = p.delta[row + l]; x[l] = p.u[row + l]; dx[l] = d[l] * x[l];
      gy[l] = g.gy[row + l]; ddx[l] = T(0); ddel[l] = T(0);
    }
    if (p.z) {  // y = (core + D u) SiLU(z): dz needs core = C_t · h_t
      T core[W];
      for (int l = 0; l < W; ++l) core[l] = T(0);
      for (int64_t n = 0; n < N; ++n) {
        const T* hn = hs + ((k + 1) * N + n) * W;
        for (int l = 0; l < W; ++l) core[l] += Ct[n] * hn[l];
      }
      for (int l = 0; l < W; ++l) {
        const T zz = p.z[row + l], sg = sigmoid(zz);
        const T pre = core[l] + p.D[e0 + l] * x[l];
        g.dz[row + l] = gy[l] * pre * sg * (T(1) + zz * (T(1) - sg));
        gy[l] *= zz * sg;
      }
    }
    for (int l = 0; l < W; ++l) part.dD[e0 + l] += gy[l] * x[l];
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      const T *hn = hs + ((k + 1) * N + n) * W, *hp = hs + (k * N + n) * W;
      const T *ak = as + (k * N + n) * W, *an = At + n * W;
      T *dhn = dh + n * W, *dan = dAt + n * W;
      T sum_c = T(0), sum_b = T(0);
#pragma omp simd reduction(+ : sum_c, sum_b)
      for (int l = 0; l < W; ++l) {
        const T dhv = dhn[l] + gy[l] * cn;  // dL/dh_t
        sum_c += gy[l] * hn[l];
        sum_b += dhv * dx[l];
        ddx[l] += dhv * bn;
        const T dlog = dhv * hp[l] * ak[l];  // dL/d(Δ_t A)
        ddel[l] += dlog * an[l];
        dan[l] += dlog * d[l];
        dhn[l] = dhv * ak[l];  // carried to t-1
      }
      dC_rows[t * N + n] += sum_c;
      dB_rows[t * N + n] += sum_b;
    }
    for (int l = 0; l < W; ++l) {
      g.du[row + l] = gy[l] * p.D[e0 + l] + ddx[l] * d[l];
      g.ddelta[row + l] = ddx[l] * x[l] + ddel[l];
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) part.dA[(e0 + l) * N + n] += dAt[n * W + l];
}

// The state after the last step of row b, channels e0..e0+W-1, into h_last (B, N, E).
template <typename T, int W>
void store_last(const Args<T>& p, int64_t b, int64_t e0, const T* h, T* h_last) {
  const int64_t E = p.inner, N = p.state;
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) h_last[(b * N + n) * E + e0 + l] = h[n * W + l];
}

// y for every step; with ckpt, the state at each chunk start; with h_last, the final state.
template <typename T>
void forward(const Args<T>& p, T* y, T* ckpt, T* h_last, int threads) {
  constexpr int W = 64 / sizeof(T);
  const Layout lay(p.batch, p.inner, W, threads);
  const int64_t N = p.state;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> hs(lay.per_group * N * W), At(N * W);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.batch * lay.groups; ++item) {
      const int64_t b = item / lay.groups, first = lay.first(item), last = lay.last(item);
      std::fill(hs.begin(), hs.end(), T(0));
      for (int64_t t0 = 0; t0 < p.length; t0 += kChunk) {
        const int64_t t1 = std::min(p.length, t0 + kChunk);
        for (int64_t blk = first; blk < last; ++blk) {
          T* h = hs.data() + (blk - first) * N * W;
          if (blk < lay.full)
            forward_chunk<T, W>(p, b, lay.e0(blk, W), t0, t1, y, ckpt, h, At.data());
          else
            forward_chunk<T, 1>(p, b, lay.e0(blk, W), t0, t1, y, ckpt, h, At.data());
        }
      }
      for (int64_t blk = first; h_last && blk < last; ++blk) {
        const T* h = hs.data() + (blk - first) * N * W;
        if (blk < lay.full)
          store_last<T, W>(p, b, lay.e0(blk, W), h, h_last);
        else
          store_last<T, 1>(p, b, lay.e0(blk, W), h, h_last);
      }
    }
  }
}

template <typename T>
void add_into(T* dst, const std::vector<T>& src) {
  for (size_t i = 0; i < src.size(); ++i) dst[i] += src[i];
}

template <typename T>
void backward(const Args<T>& p, const Grads<T>& g, int threads) {
  constexpr int W = 64 / sizeof(T);
  const Layout lay(p.batch, p.inner, W, threads);
  const int64_t N = p.state, items = p.batch * lay.groups, LN = p.length * N;
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = items * tid / nt, hi = items * (tid + 1) / nt;
    if (lo < hi) {  // a contiguous range of items: batch rows lo/groups .. (hi-1)/groups
      const int64_t b_first = lo / lay.groups, rows = (hi - 1) / lay.groups - b_first + 1;
      Partial<T> part{b_first, std::vector<T>(rows * LN), std::vector<T>(rows * LN),
                      std::vector<T>(p.inner * N), std::vector<T>(p.inner)};
      std::vector<T> dhs(lay.per_group * N * W), hs((kChunk + 1) * N * W),
          as(kChunk * N * W), At(N * W), dAt(N * W);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / lay.groups, first = lay.first(item), last = lay.last(item);
        std::fill(dhs.begin(), dhs.end(), T(0));
        for (int64_t c = p.chunks - 1; c >= 0; --c) {
          const int64_t t0 = c * kChunk, t1 = std::min(p.length, t0 + kChunk);
          for (int64_t blk = first; blk < last; ++blk) {
            T* dh = dhs.data() + (blk - first) * N * W;
            if (blk < lay.full)
              backward_chunk<T, W>(p, g, b, lay.e0(blk, W), t0, t1, dh, hs.data(), as.data(),
                                   At.data(), dAt.data(), part);
            else
              backward_chunk<T, 1>(p, g, b, lay.e0(blk, W), t0, t1, dh, hs.data(), as.data(),
                                   At.data(), dAt.data(), part);
          }
        }
      }
#pragma omp critical
      {
        for (int64_t r = 0; r < rows * LN; ++r) {
          g.dB[b_first * LN + r] += part.dB[r];
          g.dC[b_first * LN + r] += part.dC[r];
        }
        add_into(g.dA, part.dA);
        add_into(g.dD, part.dD);
      }
    }
  }
}

}  // namespace

#define SSM_ENTRY_POINTS(T, SUFFIX)                                                          \
  extern "C" void ssm_forward_##SUFFIX(const T* u, const T* delta, const T* A, const T* B,  \
                                        const T* C, const T* D, const T* z, T* y, T* ckpt,  \
                                        T* h_last, int64_t batch, int64_t length,           \
                                        int64_t inner, int64_t state, int threads) {        \
    const Args<T> p{u, delta, A, B, C, D, z, batch, length, inner, state,                   \
                    (length + kChunk - 1) / kChunk};                                          \
    forward(p, y, ckpt, h_last, threads);                                                    \
  }                                                                                           \
  extern "C" void ssm_backward_##SUFFIX(                                                     \
      const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z, \
      const T* ckpt, const T* gy, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dz,       \
      int64_t batch, int64_t length, int64_t inner, int64_t state, int threads) {            \
    const Args<T> p{u, delta, A, B, C, D, z, batch, length, inner, state,                   \
                    (length + kChunk - 1) / kChunk};                                          \
    backward(p, Grads<T>{ckpt, gy, du, ddelta, dz, dA, dB, dC, dD}, threads);                \
  }

SSM_ENTRY_POINTS(float, f32)
SSM_ENTRY_POINTS(double, f64)

extern "C" int64_t ssm_chunk() { return kChunk; }
