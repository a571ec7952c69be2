// Decode attention over the paged KV cache: each row's one new token (all its query heads) attends
// to the keys and values its block table points at, read in place, once, where the gather path
// copies them out of the pool first and SDPA reads the copy again. The pool is bf16 or fp32, each
// element widened to fp32 in registers; scores, softmax and sums are fp32. Why a kernel of our own:
// spyre_backend/device/cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using namespace spyre_kernels;

// scores[g] = q[g] . k for the group's queries (q [group, D], already scaled)
template <int64_t group, typename T>
inline void group_dot(const float* q, const T* k, int64_t D, float* scores) {
  int64_t d_vec = 0;
#ifdef SPYRE_SIMD
  d_vec = D - D % kLanes;
  vfloat acc[group];
  for (int64_t g = 0; g < group; ++g) acc[g] = vzero();
  for (int64_t d = 0; d < d_vec; d += kLanes) {
    vfloat wide = vwiden(k + d);
    for (int64_t g = 0; g < group; ++g) acc[g] = vfma(wide, vload(q + g * D + d), acc[g]);
  }
  for (int64_t g = 0; g < group; ++g) scores[g] = vsum(acc[g]);
#else
  for (int64_t g = 0; g < group; ++g) scores[g] = 0.f;
#endif
  for (int64_t d = d_vec; d < D; ++d) {
    const float kd = widen(k[d]);
    for (int64_t g = 0; g < group; ++g) scores[g] += q[g * D + d] * kd;
  }
}

// out[g] += p[g] * v for the group's outputs (out [group, D])
template <int64_t group, typename T>
inline void group_axpy(const float* p, const T* v, int64_t D, float* out) {
  int64_t d_vec = 0;
#ifdef SPYRE_SIMD
  d_vec = D - D % kLanes;
  for (int64_t d = 0; d < d_vec; d += kLanes) {
    vfloat wide = vwiden(v + d);
    for (int64_t g = 0; g < group; ++g) vstore(out + g * D + d, vfma(wide, vbroadcast(p[g]), vload(out + g * D + d)));
  }
#endif
  for (int64_t d = d_vec; d < D; ++d) {
    const float vd = widen(v[d]);
    for (int64_t g = 0; g < group; ++g) out[g * D + d] += p[g] * vd;
  }
}

struct Shape {
  int64_t ctx_blocks, block_size, kv_heads, group, D;
  int64_t heads() const { return kv_heads * group; }
};

// What one split of a row's context leaves for the combine: per query head the largest score, the
// sum of exp(score - largest), and the sum of the values weighted by those ([heads, D]).
struct Partial {
  std::vector<float> best, total, out;
};

// One row's query heads (q [heads, D], scaled) over cached tokens [t_begin, t_end) of its context.
// Token by token, all kv heads at once: a block's keys are one contiguous stretch of the pool, so
// the reads stream (a kv head at a time strided 128-byte reads a page apart: ~3 GB/s).
template <int64_t group, typename T>
void attend(const float* q, const T* keys, const T* values, const int64_t* table, const bool* visible,
            int64_t t_begin, int64_t t_end, const Shape& s, Partial& part) {
  const int64_t heads = s.heads(), token_stride = s.kv_heads * s.D;
  std::vector<float> scores((t_end - t_begin) * heads);  // [token, head]
  part.best.assign(heads, -std::numeric_limits<float>::infinity());
  part.total.assign(heads, 0.f);
  part.out.assign(heads * s.D, 0.f);
  auto cached = [&](const T* pool, int64_t t) {
    return pool + (table[t / s.block_size] * s.block_size + t % s.block_size) * token_stride;
  };
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!visible[t]) continue;
    float* row = scores.data() + (t - t_begin) * heads;
    const T* k = cached(keys, t);
    for (int64_t h = 0; h < s.kv_heads; ++h) group_dot<group>(q + h * group * s.D, k + h * s.D, s.D, row + h * group);
    for (int64_t i = 0; i < heads; ++i) part.best[i] = std::max(part.best[i], row[i]);
  }
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!visible[t]) continue;
    float* row = scores.data() + (t - t_begin) * heads;
    for (int64_t i = 0; i < heads; ++i) part.total[i] += (row[i] = std::exp(row[i] - part.best[i]));
    const T* v = cached(values, t);
    for (int64_t h = 0; h < s.kv_heads; ++h)
      group_axpy<group>(row + h * group, v + h * s.D, s.D, part.out.data() + h * group * s.D);
  }
}

template <typename T>
void attend_group(const float* q, const T* keys, const T* values, const int64_t* table, const bool* visible,
                  int64_t t_begin, int64_t t_end, const Shape& s, Partial& part) {
  switch (s.group) {
    case 1: attend<1>(q, keys, values, table, visible, t_begin, t_end, s, part); break;
    case 2: attend<2>(q, keys, values, table, visible, t_begin, t_end, s, part); break;
    case 4: attend<4>(q, keys, values, table, visible, t_begin, t_end, s, part); break;
    case 8: attend<8>(q, keys, values, table, visible, t_begin, t_end, s, part); break;
    default: attend<16>(q, keys, values, table, visible, t_begin, t_end, s, part); break;
  }
}

// out [heads, D] from a row's partials (parts[0 .. splits)): each rescaled to the largest score of
// all, then normalised.
void combine(const Partial* parts, int64_t splits, int64_t heads, int64_t D, float* out) {
  for (int64_t i = 0; i < heads; ++i) {
    float best = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t p = 0; p < splits; ++p) best = std::max(best, parts[p].best[i]);
    std::fill(out + i * D, out + (i + 1) * D, 0.f);
    if (best == -std::numeric_limits<float>::infinity()) continue;  // no visible key: zeros
    for (int64_t p = 0; p < splits; ++p) {
      const Partial& part = parts[p];
      if (part.total[i] == 0.f) continue;
      const float weight = std::exp(part.best[i] - best);
      total += weight * part.total[i];
      for (int64_t d = 0; d < D; ++d) out[i * D + d] += weight * part.out[i * D + d];
    }
    for (int64_t d = 0; d < D; ++d) out[i * D + d] /= total;
  }
}

// query [rows, heads, D]; pools [blocks, block_size, kv_heads, D]; block_table [rows, ctx_blocks];
// visible [rows, ctx_blocks * block_size] (the mask: which cached tokens each row sees)
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key_pool, const at::Tensor& value_pool,
                            const at::Tensor& block_table, const at::Tensor& visible, double scale) {
  const auto type = key_pool.scalar_type();
  TORCH_CHECK(type == at::kBFloat16 || type == at::kFloat, "decode_attention: the KV pool must be bf16 or fp32, got ", type);
  TORCH_CHECK(value_pool.scalar_type() == type && key_pool.sizes() == value_pool.sizes(),
              "decode_attention: the key and value pools must match");
  TORCH_CHECK(key_pool.dim() == 4 && key_pool.is_contiguous() && value_pool.is_contiguous(),
              "decode_attention: the pools must be contiguous [blocks, block_size, kv_heads, head_dim]");
  const int64_t block_size = key_pool.size(1), kv_heads = key_pool.size(2), D = key_pool.size(3);
  TORCH_CHECK(query.dim() == 3 && query.size(2) == D && query.size(1) % kv_heads == 0,
              "decode_attention: the query must be [rows, heads, ", D, "] with heads a multiple of ", kv_heads);
  const int64_t rows = query.size(0), heads = query.size(1), group = heads / kv_heads;
  TORCH_CHECK(group == 1 || group == 2 || group == 4 || group == 8 || group == 16,
              "decode_attention: 1, 2, 4, 8 or 16 query heads per kv head, got ", group);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == rows && block_table.scalar_type() == at::kLong,
              "decode_attention: block_table must be int64 [rows, ctx_blocks]");
  const int64_t ctx_blocks = block_table.size(1);
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.numel() == rows * ctx_blocks * block_size,
              "decode_attention: visible must be bool [rows, ", ctx_blocks * block_size, "]");
  at::Tensor table = block_table.contiguous(), mask = visible.contiguous();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t num_blocks = key_pool.size(0);
  for (int64_t i = 0; i < table.numel(); ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < num_blocks, "decode_attention: block ", tp[i], " is not in the pool");
  at::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  at::Tensor out = at::empty({rows, heads, D}, q.options());
  const Shape shape{ctx_blocks, block_size, kv_heads, group, D};
  // a row's context in splits of whole blocks, so that a few rows still give every thread work, and
  // evenly (3 rows on 2 threads: 6 tasks, not 3)
  const int64_t wanted = 2 * at::get_num_threads();
  const int64_t splits = std::min<int64_t>(ctx_blocks, std::max<int64_t>(1, (wanted + rows - 1) / rows));
  const int64_t blocks_per_split = (ctx_blocks + splits - 1) / splits;
  std::vector<Partial> parts(rows * splits);
  const float* qp = q.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / splits, split = task % splits;
      const int64_t t_begin = std::min(ctx_blocks, split * blocks_per_split) * block_size;
      const int64_t t_end = std::min(ctx_blocks, (split + 1) * blocks_per_split) * block_size;
      const float* qr = qp + r * heads * D;
      const int64_t* row_table = tp + r * ctx_blocks;
      const bool* row_visible = mp + r * ctx_blocks * block_size;
      if (type == at::kBFloat16) {
        const auto* k = reinterpret_cast<const uint16_t*>(key_pool.data_ptr<at::BFloat16>());
        const auto* v = reinterpret_cast<const uint16_t*>(value_pool.data_ptr<at::BFloat16>());
        attend_group(qr, k, v, row_table, row_visible, t_begin, t_end, shape, parts[task]);
      } else {
        attend_group(qr, key_pool.data_ptr<float>(), value_pool.data_ptr<float>(), row_table, row_visible, t_begin,
                     t_end, shape, parts[task]);
      }
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) combine(parts.data() + r * splits, splits, heads, D, op + r * heads * D);
  return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spyre_kernels, m) {
  m.def("decode_attention(Tensor query, Tensor key_pool, Tensor value_pool, Tensor block_table, Tensor visible, "
        "float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
