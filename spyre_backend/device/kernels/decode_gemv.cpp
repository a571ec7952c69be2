// y = x @ W.T (* scale) for a few rows of x (a decode step), reading the weight W [N, K] once at
// memory speed. W is bf16, int8 (with one fp32 scale per output row) or fp32; each weight element
// is widened to fp32 in registers (a bf16 is the top half of an fp32) and multiplied with the rows
// in fp32, with fp32 sums. Why a kernel of our own: spyre_backend/device/cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstdint>

#include "simd.h"

namespace {

using namespace spyre_kernels;

constexpr int kMaxRows = 4;  // at 8 rows oneDNN's kernels were the faster
// Software prefetch this many bytes ahead in the weight stream: on 2-core VMs the hardware
// prefetcher alone left one row's matrix-vector product at ~13 GB/s; with it, 17-19 GB/s.
constexpr int kPrefetchBytes = 16384;
constexpr int kLineBytes = 64;  // one cache line of weight per step of the inner loop

template <typename W, int M>
void rows_times_weight(const W* w, const float* scale, const float* x, float* y, int64_t n_begin, int64_t n_end,
                       int64_t K, int64_t N) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = w + n * K;
    float sums[M] = {};
    int64_t k = 0;
#ifdef SPYRE_SIMD
    constexpr int kStep = kLineBytes / sizeof(W);  // weights per cache line
    constexpr int kChunks = kStep / kLanes;         // vectors per cache line, each with its own sums
    vfloat acc[M][kChunks];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < kChunks; ++c) acc[m][c] = vzero();
    for (; k + kStep <= K; k += kStep) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int c = 0; c < kChunks; ++c) {
        vfloat wide = vwiden(row + k + c * kLanes);
        for (int m = 0; m < M; ++m) acc[m][c] = vfma(wide, vload(x + m * K + k + c * kLanes), acc[m][c]);
      }
    }
    for (int m = 0; m < M; ++m) {
      vfloat total = acc[m][0];
      for (int c = 1; c < kChunks; ++c) total = total + acc[m][c];
      sums[m] = vsum(total);
    }
#endif
    for (; k < K; ++k) {
      float wk = widen(row[k]);
      for (int m = 0; m < M; ++m) sums[m] += wk * x[m * K + k];
    }
    const float s = scale == nullptr ? 1.f : scale[n];
    for (int m = 0; m < M; ++m) y[m * N + n] = scale == nullptr ? sums[m] : sums[m] * s;
  }
}

template <typename W, int M>
void run(const W* w, const float* scale, const float* x, float* y, int64_t K, int64_t N) {
  // >= 256 KiB of weight per task (64 rows of a 2048-wide bf16 weight), so threads share the stream
  const int64_t grain = std::max<int64_t>(16, (256 << 10) / std::max<int64_t>(1, K * int64_t(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    rows_times_weight<W, M>(w, scale, x, y, begin, end, K, N);
  });
}

template <typename W>
void dispatch_rows(const W* w, const float* scale, const float* x, float* y, int64_t M, int64_t K, int64_t N) {
  switch (M) {
    case 1: run<W, 1>(w, scale, x, y, K, N); break;
    case 2: run<W, 2>(w, scale, x, y, K, N); break;
    case 3: run<W, 3>(w, scale, x, y, K, N); break;
    default: run<W, 4>(w, scale, x, y, K, N); break;
  }
}

at::Tensor decode_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale) {
  const auto type = weight.scalar_type();
  TORCH_CHECK(type == at::kBFloat16 || type == at::kChar || type == at::kFloat,
              "decode_gemv: the weight must be bf16, int8 or fp32, got ", type);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "decode_gemv: the weight must be contiguous and 2-D");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "decode_gemv: x must be [rows, ", weight.size(1), "]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "decode_gemv: 1 to ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK((type == at::kChar) == scale.has_value(), "decode_gemv: an int8 weight needs its scale, no other does");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
  at::Tensor scale_f;
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == N, "decode_gemv: one scale per output row (", N, "), got ", scale->numel());
    scale_f = scale->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* sp = scale_f.defined() ? scale_f.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (type == at::kBFloat16)
    dispatch_rows(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), sp, xp, yp, M, K, N);
  else if (type == at::kChar)
    dispatch_rows(weight.data_ptr<int8_t>(), sp, xp, yp, M, K, N);
  else
    dispatch_rows(weight.data_ptr<float>(), sp, xp, yp, M, K, N);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spyre_kernels, m) {
  m.def("decode_gemv(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor");
  m.impl("decode_gemv", c10::DispatchKey::CPU, TORCH_FN(decode_gemv));
}
