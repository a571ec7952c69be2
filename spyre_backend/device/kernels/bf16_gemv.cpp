// y = x @ W.T for a few rows of x (a decode step) and a bf16 weight W [N, K], read once at memory
// speed: each weight element is widened to fp32 in registers (a bf16 is the top half of an fp32)
// and multiplied with the rows in fp32, with fp32 sums. Why a kernel of our own:
// spyre_backend/device/gemv_kernel.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kMaxRows = 4;  // at 8 rows oneDNN's bf16 kernel was the faster
// Software prefetch this many bytes ahead in the weight stream: on 2-core VMs the hardware
// prefetcher alone left one row's matrix-vector product at ~13 GB/s; with it, 17-19 GB/s.
constexpr int kPrefetchBytes = 16384;

inline float widen(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

template <int M>
void rows_times_weight(const uint16_t* w, const float* x, float* y, int64_t n_begin, int64_t n_end,
                       int64_t K, int64_t N) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint16_t* row = w + n * K;
    float sums[M];
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 lo_acc[M], hi_acc[M];
    for (int m = 0; m < M; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(row + k));
      __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
      __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
      for (int m = 0; m < M; ++m) {
        lo_acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * K + k), lo_acc[m]);
        hi_acc[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * K + k + 16), hi_acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc[m], hi_acc[m]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 lo_acc[M], hi_acc[M];
    for (int m = 0; m < M; ++m) lo_acc[m] = hi_acc[m] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPrefetchBytes, _MM_HINT_T0);
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
      __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
      for (int m = 0; m < M; ++m) {
        lo_acc[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), lo_acc[m]);
        hi_acc[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), hi_acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 v = _mm256_add_ps(lo_acc[m], hi_acc[m]);
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      sums[m] = _mm_cvtss_f32(s);
    }
#else
    for (int m = 0; m < M; ++m) sums[m] = 0.f;
#endif
    for (; k < K; ++k) {
      float wk = widen(row[k]);
      for (int m = 0; m < M; ++m) sums[m] += wk * x[m * K + k];
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = sums[m];
  }
}

template <int M>
void run(const uint16_t* w, const float* x, float* y, int64_t K, int64_t N) {
  // 64 output rows per task at least: a 2048-wide bf16 row is 4 KiB, so a task reads >= 256 KiB
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { rows_times_weight<M>(w, x, y, begin, end, K, N); });
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "bf16_gemv: the weight must be a contiguous 2-D bf16 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "bf16_gemv: x must be [rows, ", weight.size(1), "]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "bf16_gemv: 1 to ", kMaxRows, " rows, got ", x.size(0));
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: run<1>(w, xp, yp, K, N); break;
    case 2: run<2>(w, xp, yp, K, N); break;
    case 3: run<3>(w, xp, yp, K, N); break;
    default: run<4>(w, xp, yp, K, N); break;
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(spyre_kernels, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor");
  m.impl("bf16_gemv", c10::DispatchKey::CPU, TORCH_FN(bf16_gemv));
}
