// y = x @ w.T for a few rows of x, reading each weight once.
//
// Decoding is memory-bound: one fp32 decoder layer of the embedded model streams ~14 MB of
// weights per call, while k <= 8 rows of activations fit in L1. BLAS's matrix-matrix path packs
// the weights for 3+ rows (on the machines measured, 3 rows cost ~1.3x one row), so verifying a
// few draft positions cost much more than one AR step. Here every output row's weights are
// loaded once and multiplied with all k activation rows (U * k independent accumulators hide the
// FMA latency); the per-row sum order is fixed, so results are deterministic. Compiled at first
// use for the machine at hand (-march=native) by lede_env.kernels, which measures it against
// BLAS and oneDNN per row count and uses whichever is fastest.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

#if defined(__clang__) || __GNUC__ >= 12
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
// horizontal sum by halving (a loop over lanes costs as much as the row's products at k = 8)
inline float hsum(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
#else
inline float hsum(v16 v) {
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}
#endif

// rows o0..o1-1 of y[K, n_out] = x[K, n_in] (row stride xs) @ w[n_out, n_in].T, U vectors of
// 16 weights per step: U * K independent accumulators hide the FMA latency. XFIRST loads the K
// activation vectors before the K products: the compiler then schedules 2 rows 12-18 % faster on
// 576-wide inputs (AMD EPYC, GCC 12, interleaved A/B), and 3 rows 10-20 % slower, so it is used
// for 2 rows only.
template <int K, int U, bool XFIRST = false>
void rows(const float* __restrict x, int64_t xs, const float* __restrict w, float* __restrict y,
          int64_t n_in, int64_t n_out, int64_t o0, int64_t o1) {
  constexpr int S = 16 * U;
  const int64_t nv = n_in / S;
  for (int64_t o = o0; o < o1; ++o) {
    const float* wr = w + o * n_in;
    v16 acc[U][K];
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < K; ++k) acc[u][k] = (v16){0};
    for (int64_t i = 0; i < nv; ++i) {
      for (int u = 0; u < U; ++u) {
        const v16 wv = *(const v16*)(wr + S * i + 16 * u);
        if constexpr (XFIRST) {  // the activations' vectors loaded before the products
          v16 xv[K];
          for (int k = 0; k < K; ++k) xv[k] = *(const v16*)(x + k * xs + S * i + 16 * u);
          for (int k = 0; k < K; ++k) acc[u][k] += wv * xv[k];
        } else {
          for (int k = 0; k < K; ++k) acc[u][k] += wv * *(const v16*)(x + k * xs + S * i + 16 * u);
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      v16 a = acc[0][k];
      for (int u = 1; u < U; ++u) a += acc[u][k];
      float s = hsum(a);
      for (int64_t i = nv * S; i < n_in; ++i) s += wr[i] * x[k * xs + i];
      y[k * n_out + o] = s;
    }
  }
}

// accumulator sets per row count (2 AMD EPYC cores: 2 sets up to 4 rows; 1 above is as fast)
constexpr int U1 = 2, U2 = 2, U3 = 2, U4 = 2, U5 = 1, U6 = 1, U7 = 1, U8 = 1;

at::Tensor skinny_linear(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(x_.device().is_cpu() && w_.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(w_.dim() == 2 && x_.size(-1) == w_.size(1), "skinny_linear: x [..., in] and w [out, in]");
  const at::Tensor w = w_.contiguous();
  const int64_t n_in = w.size(1), n_out = w.size(0), n_rows = x_.numel() / n_in;
  TORCH_CHECK(n_rows >= 1 && n_rows <= 8, "skinny_linear: 1..8 rows, got ", n_rows);
  // rows padded by 16 floats: row starts 2 KiB apart by a multiple of 4 KiB alias in L1
  const int64_t xs = n_in + 16;
  at::Tensor xb = at::empty({n_rows, xs}, x_.options());
  xb.narrow(1, 0, n_in).copy_(x_.reshape({n_rows, n_in}));
  std::vector<int64_t> sizes = x_.sizes().vec();
  sizes.back() = n_out;
  at::Tensor y = at::empty(sizes, x_.options());
  const float* xp = xb.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_out, 64, [&](int64_t a, int64_t b) {
    switch (n_rows) {
      case 1: rows<1, U1>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 2: rows<2, U2, true>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 3: rows<3, U3>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 4: rows<4, U4>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 5: rows<5, U5>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 6: rows<6, U6>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      case 7: rows<7, U7>(xp, xs, wp, yp, n_in, n_out, a, b); break;
      default: rows<8, U8>(xp, xs, wp, yp, n_in, n_out, a, b); break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lede_kernels, m) { m.def("skinny_linear(Tensor x, Tensor w) -> Tensor", &skinny_linear); }
