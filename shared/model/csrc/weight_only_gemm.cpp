// Weight-only quantized GEMM for CPUs at decode batch sizes (float32 activations): out [M, N]
// = x [M, K] @ W with W held as 4- or 8-bit integers packed into int32 along K and one scale
// and offset per (group of K, column): pagewire.model.quantization.weight_only's layout.
//
// Within a group w = q * s + o with s, o fixed per column, so
//   sum_k x[m,k] w[k,n] = s[n] * sum_k x[m,k] q[k,n] + o[n] * sum_k x[m,k]:
// the inner loop only converts integers and multiplies-adds (vectorized over a tile of
// columns), and the scale and offset apply once per group. Each weight is read once per call
// (4 bits of it), which is what a decode step is bound by; the torch path instead writes a
// float32 copy of the whole layer first. Parallel over tiles of columns.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {
constexpr int64_t kTile = 64;
}

torch::Tensor weight_only_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                               torch::Tensor offsets, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && qweight.dtype() == torch::kInt32,
              "weight_only_gemm: float32 x and int32 qweight");
  TORCH_CHECK(bits == 4 || bits == 8, "weight_only_gemm: 4 or 8 bits");
  x = x.contiguous();
  qweight = qweight.contiguous();
  auto s_t = scales.to(torch::kFloat32).contiguous();
  auto o_t = offsets.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1);
  const int64_t per_word = 32 / bits, mask = (1 << bits) - 1, groups = K / group;
  TORCH_CHECK(qweight.size(0) * per_word == K && K % group == 0 && group % per_word == 0,
              "weight_only_gemm: shape mismatch");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const float* sp = s_t.data_ptr<float>();
  const float* op = o_t.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  // Per row and group: the sum of x over the group (the offset's multiplier).
  std::vector<float> xsum(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * groups + k / group] += xp[m * K + k];
  const int64_t tiles = (N + kTile - 1) / kTile;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kTile, width = std::min(kTile, N - n0);
    std::vector<float> acc(M * kTile, 0.f), part(M * kTile);
    float w[kTile];
    for (int64_t g = 0; g < groups; ++g) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const uint32_t* row = qp + (k / per_word) * N + n0;
        const uint32_t shift = (k % per_word) * bits;
        for (int64_t j = 0; j < kTile; ++j)
          w[j] = j < width ? static_cast<float>((row[j] >> shift) & mask) : 0.f;
        for (int64_t m = 0; m < M; ++m) {
          const float xv = xp[m * K + k];
          float* pr = part.data() + m * kTile;
          for (int64_t j = 0; j < kTile; ++j) pr[j] += xv * w[j];
        }
      }
      const float* s = sp + g * N + n0;
      const float* o = op + g * N + n0;
      for (int64_t m = 0; m < M; ++m) {
        const float xs = xsum[m * groups + g];
        float* a = acc.data() + m * kTile;
        const float* pr = part.data() + m * kTile;
        for (int64_t j = 0; j < width; ++j) a[j] += s[j] * pr[j] + o[j] * xs;
      }
    }
    for (int64_t m = 0; m < M; ++m)
      std::copy(acc.data() + m * kTile, acc.data() + m * kTile + width, outp + m * N + n0);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_only_gemm", &weight_only_gemm,
        "x [M, K] float32 @ packed integer weights (scales and offsets by group)");
}
