// Decode attention straight from the paged KV pool, for the CPU.
//
// One query token per sequence. K/V rows are read in place through the slot table (no
// gathered copy), the query heads that share a KV head are processed together so each K/V
// row is converted to float once, and the math (scores, softmax, weighted sum) is float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, float* dst, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) dst[d] = to_float(src[d]);
}

template <typename T>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache,
                           const torch::Tensor& v_cache, const torch::Tensor& slots,
                           const torch::Tensor& lens, torch::Tensor& out, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), pool = k_cache.size(1);
  const int64_t group = heads / kv_heads, max_len = slots.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), row(dim), scores(group * max_len), acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, len = len_ptr[b];
      const int64_t* seq_slots = slot_ptr + b * max_len;
      for (int64_t g = 0; g < group; ++g) {
        load_row(q_ptr + (b * heads + h * group + g) * dim, qf.data() + g * dim, dim);
        for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] *= fscale;
      }
      for (int64_t l = 0; l < len; ++l) {
        load_row(k_ptr + (h * pool + seq_slots[l]) * dim, row.data(), dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * row[d];
          scores[g * max_len + l] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * max_len;
        const float peak = *std::max_element(sg, sg + len);
        float total = 0.f;
        // expf (not std::exp) in a simd loop: glibc's vector expf makes it 8-16 wide.
#pragma omp simd reduction(+ : total)
        for (int64_t l = 0; l < len; ++l) {
          sg[l] = expf(sg[l] - peak);
          total += sg[l];
        }
        const float inv = 1.f / total;
        for (int64_t l = 0; l < len; ++l) sg[l] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < len; ++l) {
        load_row(v_ptr + (h * pool + seq_slots[l]) * dim, row.data(), dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * max_len + l];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out_ptr + (b * heads + h * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[g * dim + d]);
      }
    }
  });
}

}  // namespace

// q [batch, heads, dim]; k_cache/v_cache [kv_heads, pool_slots, dim]; slots [batch, max_len]
// (int64, padded); lens [batch] (int64, each >= 1). Returns [batch, heads, dim].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor slots, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(slots.is_contiguous() && lens.is_contiguous());
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "heads must be a multiple of kv_heads");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] {
    decode_attention_impl<scalar_t>(q, k_cache, v_cache, slots, lens, out, scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
}
