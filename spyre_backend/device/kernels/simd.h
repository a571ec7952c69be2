// What the CPU kernels share: a weight or cache element widened to fp32, and the few vector
// operations their loops need, once per instruction set (AVX-512, AVX2 + FMA, else plain C++ only).
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace spyre_kernels {

inline float widen(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline float widen(int8_t value) { return float(value); }
inline float widen(float value) { return value; }

// The vector width and the few vector operations the loops need, once per instruction set;
// SPYRE_SIMD where there are any.
#if defined(__AVX512F__)
#define SPYRE_SIMD 1
using vfloat = __m512;
constexpr int kLanes = 16;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vbroadcast(float x) { return _mm512_set1_ps(x); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline vfloat vwiden(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline vfloat vwiden(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vwiden(const float* p) { return _mm512_loadu_ps(p); }
#elif defined(__AVX2__) && defined(__FMA__)
#define SPYRE_SIMD 1
using vfloat = __m256;
constexpr int kLanes = 8;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vbroadcast(float x) { return _mm256_set1_ps(x); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vfloat vwiden(const uint16_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vfloat vwiden(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vwiden(const float* p) { return _mm256_loadu_ps(p); }
#else
constexpr int kLanes = 0;  // plain C++ only
#endif

}  // namespace spyre_kernels
