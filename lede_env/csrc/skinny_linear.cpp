// y = x @ w.T for a few rows of x, reading each weight once: the "skinny" kernel on weights as
// they are, and the "packed" kernel on a copy of the weights in blocks of 4 output rows.
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

// activation rows are padded by 16 floats: row starts 2 KiB apart by a multiple of 4 KiB alias in L1
inline int64_t padded_stride(int64_t n_in) { return n_in + 16; }

// x [..., n_in] copied into n_rows rows of padded_stride(n_in) floats
at::Tensor padded_rows(const at::Tensor& x, int64_t n_rows, int64_t n_in) {
  at::Tensor xb = at::empty({n_rows, padded_stride(n_in)}, x.options());
  xb.narrow(1, 0, n_in).copy_(x.reshape({n_rows, n_in}));
  return xb;
}

// an uninitialised [..., n_out] result for x [..., n_in]
at::Tensor output_like(const at::Tensor& x, int64_t n_out) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n_out;
  return at::empty(sizes, x.options());
}

at::Tensor skinny_linear(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(x_.device().is_cpu() && w_.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(w_.dim() == 2 && x_.size(-1) == w_.size(1), "skinny_linear: x [..., in] and w [out, in]");
  const at::Tensor w = w_.contiguous();
  const int64_t n_in = w.size(1), n_out = w.size(0), n_rows = x_.numel() / n_in;
  TORCH_CHECK(n_rows >= 1 && n_rows <= 8, "skinny_linear: 1..8 rows, got ", n_rows);
  const int64_t xs = padded_stride(n_in);
  const at::Tensor xb = padded_rows(x_, n_rows, n_in);
  at::Tensor y = output_like(x_, n_out);
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


// ---- the "packed" kernel -------------------------------------------------------------------
// One output row at a time (above) leaves each activation vector loaded once per weight vector:
// at 5-8 rows the loads, not the memory stream, bound the kernel. Here a block of P output rows
// is multiplied with up to KP activation rows at once (P * KP accumulators: each weight vector
// is used KP times and each activation vector P times per load). Reading P rows of the
// original [n_out, n_in] matrix side by side was 1.5x slower than one row at a time on AMD EPYC
// (P streams 2-6 KiB apart defeat the hardware prefetcher), so the weights are copied once into
// the order the kernel reads them, [n_out / P][n_in / 16][P][16]: one sequential stream, which
// the kernel prefetches PF_FLOATS ahead into L2 (the hardware prefetcher alone let the core
// stall on memory while it computes). Measured on 2 AMD EPYC cores, all 30 layers + LM head of
// the embedded model: 8 rows 36 -> 28 ms, 4 rows 20 -> 17 ms, 1 row 16.5 -> 16 ms with a 4 KiB
// prefetch into L1 (prefetchnta); a 16 KiB prefetch into L2 (locality 1) then took 8 rows to
// 19-21 ms, 9 rows 28 -> 20-22 ms, c(8) 1.5 -> 1.1 (same run, 5 repeats; 8-32 KiB at locality
// 1-2 all within noise; into L1, locality 3, as slow as before: it evicts the activations).
constexpr int P = 4;             // output rows per block
constexpr int KP = 6;            // activation rows per pass over a block (more: a second pass)
constexpr int PF_FLOATS = 4096;  // software prefetch distance (16 KiB)
constexpr int PF_LOCALITY = 1;   // __builtin_prefetch locality: into L2, not L1

template <int K>
inline void packed_block(const float* __restrict x, int64_t xs, const float* __restrict wb,
                         float* __restrict y, int64_t nv, int64_t n_out, int64_t o) {
  v16 acc[P][K];
  for (int r = 0; r < P; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = (v16){0};
  for (int64_t i = 0; i < nv; ++i) {
    v16 wv[P];
    for (int r = 0; r < P; ++r) {
      __builtin_prefetch(wb + (i * P + r) * 16 + PF_FLOATS, 0, PF_LOCALITY);
      wv[r] = *(const v16*)(wb + (i * P + r) * 16);
    }
    for (int k = 0; k < K; ++k) {
      const v16 xv = *(const v16*)(x + k * xs + 16 * i);
      for (int r = 0; r < P; ++r) acc[r][k] += wv[r] * xv;
    }
  }
  for (int r = 0; r < P; ++r)
    for (int k = 0; k < K; ++k) y[k * n_out + o + r] = hsum(acc[r][k]);
}

// rows K of x against one block: passes of up to KP activation rows (the block is still in
// L1/L2 for the later passes)
template <int K>
inline void packed_passes(const float* x, int64_t xs, const float* wb, float* y, int64_t nv, int64_t n_out,
                          int64_t o) {
  if constexpr (K <= KP) {
    packed_block<K>(x, xs, wb, y, nv, n_out, o);
  } else {
    packed_block<KP>(x, xs, wb, y, nv, n_out, o);
    packed_passes<K - KP>(x + KP * xs, xs, wb, y + KP * n_out, nv, n_out, o);
  }
}

// blocks b0..b1-1 (output rows P*b0 .. P*b1-1) for K activation rows
template <int K>
void packed_rows(const float* x, int64_t xs, const float* wp, float* y, int64_t nv, int64_t n_out,
                 int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) packed_passes<K>(x, xs, wp + b * nv * P * 16, y, nv, n_out, b * P);
}

// w [n_out, n_in] -> [n_out / P, n_in / 16, P, 16]
at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2, "pack_weight: 2-D fp32 CPU weight");
  const int64_t n_out = w.size(0), n_in = w.size(1);
  TORCH_CHECK(n_out % P == 0 && n_in % 16 == 0, "pack_weight: out must be a multiple of ", P,
              " and in of 16, got [", n_out, ", ", n_in, "]");
  return w.reshape({n_out / P, P, n_in / 16, 16}).transpose(1, 2).contiguous();
}

at::Tensor packed_linear(const at::Tensor& x_, const at::Tensor& wp) {
  TORCH_CHECK(x_.device().is_cpu() && wp.device().is_cpu() && x_.scalar_type() == at::kFloat &&
              wp.scalar_type() == at::kFloat, "packed_linear: fp32 CPU tensors only");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == P && wp.size(3) == 16 && wp.is_contiguous(),
              "packed_linear: w must come from pack_weight");
  const int64_t nb = wp.size(0), nv = wp.size(1), n_in = nv * 16, n_out = nb * P;
  TORCH_CHECK(x_.size(-1) == n_in, "packed_linear: x [..., ", n_in, "], got last dim ", x_.size(-1));
  const int64_t n_rows = x_.numel() / n_in;
  TORCH_CHECK(n_rows >= 1 && n_rows <= 16, "packed_linear: 1..16 rows, got ", n_rows);
  const int64_t xs = padded_stride(n_in);
  const at::Tensor xb = padded_rows(x_, n_rows, n_in);
  at::Tensor y = output_like(x_, n_out);
  const float* xp = xb.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, nb, 16, [&](int64_t a, int64_t b) {
    switch (n_rows) {
      case 1: packed_rows<1>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 2: packed_rows<2>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 3: packed_rows<3>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 4: packed_rows<4>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 5: packed_rows<5>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 6: packed_rows<6>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 7: packed_rows<7>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 8: packed_rows<8>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 9: packed_rows<9>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 10: packed_rows<10>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 11: packed_rows<11>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 12: packed_rows<12>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 13: packed_rows<13>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 14: packed_rows<14>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      case 15: packed_rows<15>(xp, xs, wpp, yp, nv, n_out, a, b); break;
      default: packed_rows<16>(xp, xs, wpp, yp, nv, n_out, a, b); break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lede_kernels, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor", &skinny_linear);
  m.def("pack_weight(Tensor w) -> Tensor", &pack_weight);
  m.def("packed_linear(Tensor x, Tensor w) -> Tensor", &packed_linear);
}
