// Paged decode attention for CPUs (float32): one query token per sequence attends to its
// context directly in the paged KV cache, reading every block once, in place. The torch
// path must gather blocks into a padded copy first; on CPUs that copy costs as much as the
// attention itself. Parallel over (sequence, kv head); each query head of a group walks the
// context twice (scores, then values) with an exact softmax.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     double scale) {
  // q: [B, H, D]; kv_cache: [2, num_blocks, block_size, KVH, D];
  // block_tables: [B, max_blocks] int32; seq_lens: [B] int32.
  TORCH_CHECK(q.dtype() == torch::kFloat32 && kv_cache.dtype() == torch::kFloat32,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
                  seq_lens.is_contiguous(), "paged_decode_attention: contiguous inputs only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2);
  const int64_t KVH = kv_cache.size(3), group = H / KVH, max_blocks = block_tables.size(1);
  TORCH_CHECK(kv_cache.size(4) == D && H % KVH == 0, "paged_decode_attention: shape mismatch");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = kv_cache.data_ptr<float>();
  const float* vp = kp + num_blocks * block_size * KVH * D;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = KVH * D, block_stride = block_size * KVH * D;

#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kvh = 0; kvh < KVH; ++kvh) {
      const int64_t len = lens[b];
      std::vector<float> scores(len);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g;
        const float* qh = qp + (b * H + h) * D;
        float max_score = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          const int64_t block = tables[b * max_blocks + t / block_size];
          const float* kt = kp + block * block_stride + (t % block_size) * token_stride + kvh * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * kt[d];
          scores[t] = dot * static_cast<float>(scale);
          max_score = std::max(max_score, scores[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          scores[t] = std::exp(scores[t] - max_score);
          sum += scores[t];
        }
        float* oh = op + (b * H + h) * D;
        std::fill(oh, oh + D, 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t block = tables[b * max_blocks + t / block_size];
          const float* vt = vp + block * block_stride + (t % block_size) * token_stride + kvh * D;
          const float w = scores[t] / sum;
          for (int64_t d = 0; d < D; ++d) oh[d] += w * vt[d];
        }
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over a float32 KV cache (CPU)");
}
