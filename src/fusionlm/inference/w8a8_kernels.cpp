// w8a8: int8 weights times int8 activations, as llama.cpp's Q8_0 dot products compute.
//
// Each call rounds every row of x to int8 per group of 32 inputs (scale = max|x| / 127, values
// rounded to nearest, ties to even), then each group's dot product with the weights is exact
// in int32 and y = sum over groups of (that sum) * weight scale * activation scale, in fp32.
// AVX-512 VNNI multiplies 64 bytes an instruction (vpdpbusd), 4x the pairs of an fp32
// multiply-add, so a decode step's 8 rows, which the fp32-activation kernels compute at the
// multiply-add units' limit, cost about a fifth as many instructions.
//
// Weights are packed for it by channel blocks of 16 (`int8_activations.pack_w8a8`): weight
// [n / 16, k / 32, 512] int8, where block b, group g holds 8 steps of 16 channels x 4
// consecutive inputs (byte 64 * s + 4 * c + j = input 32 * g + 4 * s + j of channel 16 * b + c),
// and scale [n / 16, k / 32, 16] fp32. One vector of weights then feeds 16 channels' sums,
// each lane one channel, and a row's 4 inputs are broadcast to all lanes: no horizontal sums,
// no per-group shuffles.
//
// Every path (AVX-512 VNNI, AVX2, portable) gives the same numbers for finite inputs: the
// integer sums are exact, and each channel's fp32 sum runs over the groups in order,
// acc = fma(float(group sum), weight scale * activation scale, acc). A row's result depends
// on that row alone (any batch, any chunk of a prompt), and rows of zeros give zeros without
// computing.

#include "cpu_isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

using fusionlm_isa::Isa;

constexpr int64_t kGroup = 32;     // inputs per scale
constexpr int64_t kChannels = 16;  // channels per packed block
constexpr int64_t kSteps = kGroup / 4;  // 4-input steps per group
constexpr int64_t kBlockGroupBytes = kChannels * kGroup;  // one block's group: 512 bytes
constexpr int kMaxRows = 8;        // rows of x per kernel call
constexpr int64_t kRowChunk = 64;  // rows whose int8 activations stay in L2 across blocks

// x rounded to int8 per group of 32: values (+ `bias`: 128 makes them the unsigned operand
// VNNI takes, 0 keeps them signed) and scales, and the rows that are not all zeros.
struct Activations {
  int64_t k;
  std::vector<uint8_t> values;  // [m, k]
  std::vector<float> scales;    // [m, k / 32]
  std::vector<int64_t> busy;    // rows with a nonzero scale, in order
};

// Row `x` [k] into values [k] and scales [k / 32]; whether any scale is nonzero.
bool quantize_row(const float* x, int64_t k, int bias, uint8_t* values, float* scales) {
  bool busy = false;
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    float amax = 0.0f;
    for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float scale = amax / 127.0f;
    const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t j = 0; j < kGroup; ++j) {
      const float q = std::min(std::max(std::nearbyint(xg[j] * inverse), -127.0f), 127.0f);
      values[g * kGroup + j] = static_cast<uint8_t>(static_cast<int>(q) + bias);
    }
    scales[g] = scale;
    busy |= scale != 0.0f;
  }
  return busy;
}

Activations quantize_rows(const at::Tensor& x, int bias) {
  const int64_t m = x.size(0), k = x.size(1), groups = k / kGroup;
  Activations a{k, std::vector<uint8_t>(m * k), std::vector<float>(m * groups), {}};
  std::vector<char> busy(m);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      busy[r] = quantize_row(xp + r * k, k, bias, &a.values[r * k], &a.scales[r * groups]);
    }
  });
  for (int64_t r = 0; r < m; ++r) {
    if (busy[r]) a.busy.push_back(r);
  }
  return a;
}

// out[row * n + c] for c < 16, the rows `row_ids[0, rows)` of x times one packed block of
// channels (weight [groups, 512], scale [groups, 16]). Each path is a Kernel<R>::run for R rows.
using BlockKernel = void (*)(int rows, const int64_t* row_ids, const Activations& a,
                             const int8_t* weight, const float* scale, float* out, int64_t n);

// The portable path, one channel at a time.
template <int R>
struct Scalar {
  static void run(const int64_t* row_ids, const Activations& a, const int8_t* weight,
                  const float* scale, float* out, int64_t n) {
    const int64_t groups = a.k / kGroup;
    for (int r = 0; r < R; ++r) {
      const int8_t* x = reinterpret_cast<const int8_t*>(&a.values[row_ids[r] * a.k]);
      const float* x_scale = &a.scales[row_ids[r] * groups];
      for (int64_t c = 0; c < kChannels; ++c) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; ++g) {
          const int8_t* w = weight + g * kBlockGroupBytes + 4 * c;
          int32_t sum = 0;
          for (int64_t s = 0; s < kSteps; ++s) {
            for (int64_t j = 0; j < 4; ++j) sum += w[64 * s + j] * x[g * kGroup + 4 * s + j];
          }
          acc = std::fma(static_cast<float>(sum), scale[g * kChannels + c] * x_scale[g], acc);
        }
        out[row_ids[r] * n + c] = acc;
      }
    }
  }
};

// 4 bytes of `p` as one int32, to broadcast.
inline int32_t four_bytes(const uint8_t* p) {
  int32_t value;
  std::memcpy(&value, p, 4);
  return value;
}

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")

// VNNI takes unsigned x (bias 128): sum (x + 128) w = x . w + 128 sum(w), so each step also
// sums the weights (once for all rows) and the group's total drops 128 of them.
template <int R>
struct Vnni {
  static void run(const int64_t* row_ids, const Activations& a, const int8_t* weight,
                  const float* scale, float* out, int64_t n) {
    const int64_t groups = a.k / kGroup;
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* wg = weight + g * kBlockGroupBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wg) + 4 * kBlockGroupBytes, _MM_HINT_T0);
      __m512i sums[R];
      for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_si512();
      __m512i weight_sums = _mm512_setzero_si512();
      for (int64_t s = 0; s < kSteps; ++s) {
        const __m512i w = _mm512_loadu_si512(wg + 64 * s);
        weight_sums = _mm512_dpbusd_epi32(weight_sums, ones, w);
        for (int r = 0; r < R; ++r) {
          const uint8_t* x = &a.values[row_ids[r] * a.k + g * kGroup + 4 * s];
          sums[r] = _mm512_dpbusd_epi32(sums[r], _mm512_set1_epi32(four_bytes(x)), w);
        }
      }
      const __m512i bias = _mm512_slli_epi32(weight_sums, 7);
      const __m512 w_scale = _mm512_loadu_ps(scale + g * kChannels);
      for (int r = 0; r < R; ++r) {
        const __m512 both = _mm512_mul_ps(w_scale, _mm512_set1_ps(a.scales[row_ids[r] * groups + g]));
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r], bias));
        acc[r] = _mm512_fmadd_ps(sum, both, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + row_ids[r] * n, acc[r]);
  }
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// AVX2 has no VNNI: |w| * (x with w's sign) in pairs (vpmaddubsw; at most 2 * 127 * 127, no
// saturation), then in fours (vpmaddwd), x signed (bias 0). Channels 0-7, then 8-15.
template <int R>
struct Avx2 {
  static void run(const int64_t* row_ids, const Activations& a, const int8_t* weight,
                  const float* scale, float* out, int64_t n) {
    const int64_t groups = a.k / kGroup;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; ++half) {
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* wg = weight + g * kBlockGroupBytes + 32 * half;
        __m256i sums[R];
        for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
        for (int64_t s = 0; s < kSteps; ++s) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * s));
          const __m256i w_abs = _mm256_abs_epi8(w);
          for (int r = 0; r < R; ++r) {
            const uint8_t* x = &a.values[row_ids[r] * a.k + g * kGroup + 4 * s];
            const __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(four_bytes(x)), w);
            const __m256i pairs = _mm256_maddubs_epi16(w_abs, signed_x);
            sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(pairs, ones));
          }
        }
        const __m256 w_scale = _mm256_loadu_ps(scale + g * kChannels + 8 * half);
        for (int r = 0; r < R; ++r) {
          const __m256 both =
              _mm256_mul_ps(w_scale, _mm256_set1_ps(a.scales[row_ids[r] * groups + g]));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), both, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + row_ids[r] * n + 8 * half, acc[r]);
    }
  }
};

#pragma GCC pop_options
#endif

// Kernel<R> for R = rows (1 to kMaxRows).
template <template <int> class Kernel, int R = kMaxRows>
void rows_of(int rows, const int64_t* row_ids, const Activations& a, const int8_t* weight,
             const float* scale, float* out, int64_t n) {
  if constexpr (R > 1) {
    if (rows < R) return rows_of<Kernel, R - 1>(rows, row_ids, a, weight, scale, out, n);
  }
  Kernel<R>::run(row_ids, a, weight, scale, out, n);
}

bool cpu_runs_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The path for the active instruction set (avx512 needs VNNI too, else AVX2's runs): its
// kernel, the bias its activations take, and its name.
struct Path {
  BlockKernel kernel;
  int bias;
  const char* name;
};

Path active_path() {
  const Isa isa = fusionlm_isa::active_isa();
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512 && cpu_runs_vnni()) return {rows_of<Vnni>, 128, "avx512_vnni"};
  if (isa != Isa::kScalar && fusionlm_isa::cpu_runs(Isa::kAvx2)) {
    return {rows_of<Avx2>, 0, "avx2"};
  }
#endif
  return {rows_of<Scalar>, 0, "scalar"};
}

// The path linear_w8a8 takes now, for tests: its paths give the same numbers, so only this
// tells which one ran.
std::string w8a8_path() { return active_path().name; }

void check_inputs(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "linear_w8a8: x must be contiguous fp32 [m, k], got ", x.sizes());
  TORCH_CHECK(x.size(1) % kGroup == 0, "linear_w8a8: k (", x.size(1), ") must be divisible by 32");
  TORCH_CHECK(weights.size() == scales.size(), "linear_w8a8: one scale per weight");
  const int64_t groups = x.size(1) / kGroup;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const auto& s = scales[i];
    TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 3 &&
                    w.size(1) == groups && w.size(2) == kBlockGroupBytes,
                "linear_w8a8: weights must be packed int8 [n / 16, ", groups, ", 512], got ",
                w.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 3 &&
                    s.size(0) == w.size(0) && s.size(1) == groups && s.size(2) == kChannels,
                "linear_w8a8: scales must be fp32 [n / 16, ", groups, ", 16], got ", s.sizes());
  }
}

// y_i [m, 16 * blocks_i] = x [m, k] @ W_i.T for each packed weight W_i, in one parallel pass
// over all their blocks of channels (a layer's q, k and v projections share x).
std::vector<at::Tensor> linear_w8a8(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList scales) {
  check_inputs(x, weights, scales);
  const Path path = active_path();
  const Activations a = quantize_rows(x, path.bias);
  const int64_t m = x.size(0), busy = static_cast<int64_t>(a.busy.size());
  std::vector<at::Tensor> outputs;
  std::vector<int64_t> first_block{0};  // weight i owns blocks [first_block[i], first_block[i + 1])
  for (const auto& w : weights) {
    const int64_t n = w.size(0) * kChannels;
    outputs.push_back(busy == m ? at::empty({m, n}, x.options()) : at::zeros({m, n}, x.options()));
    first_block.push_back(first_block.back() + w.size(0));
  }
  at::parallel_for(0, first_block.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = 0; chunk < busy; chunk += kRowChunk) {
      const int64_t chunk_end = std::min(busy, chunk + kRowChunk);
      for (size_t i = 0; i < weights.size(); ++i) {
        const int64_t first = std::max(begin, first_block[i]) - first_block[i];
        const int64_t stop = std::min(end, first_block[i + 1]) - first_block[i];
        const int64_t n = (first_block[i + 1] - first_block[i]) * kChannels;
        const int8_t* w = weights[i].data_ptr<int8_t>();
        const float* s = scales[i].data_ptr<float>();
        float* out = outputs[i].data_ptr<float>();
        for (int64_t b = first; b < stop; ++b) {
          for (int64_t r = chunk; r < chunk_end; r += kMaxRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, chunk_end - r));
            path.kernel(rows, &a.busy[r], a, w + b * (a.k / kGroup) * kBlockGroupBytes,
                        s + b * (a.k / kGroup) * kChannels, out + b * kChannels, n);
          }
        }
      }
    }
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusionlm, m) {
  // x [m, k] fp32, rounded to int8 per group of 32 inputs, @ weights[i] (packed int8
  // [n_i / 16, k / 32, 512], scales[i] fp32 [n_i / 16, k / 32, 16]).T -> [m, n_i] fp32
  m.def("linear_w8a8(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor[]");
  // "avx512_vnni", "avx2" or "scalar": the path linear_w8a8 takes under the current use_isa
  m.def("w8a8_path() -> str", &w8a8_path);
}

TORCH_LIBRARY_IMPL(fusionlm, CPU, m) { m.impl("linear_w8a8", &linear_w8a8); }
