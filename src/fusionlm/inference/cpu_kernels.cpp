// Kernels for decoding on CPU, where PyTorch's general ones lose time:
// - matrix-vector products y = x @ W.T for a few rows of fp32 activations, with W stored as
//   fp32, as bf16, as int8 with one fp32 scale per 32 consecutive inputs (llama.cpp's Q8_0
//   layout), or as int4 with an fp32 scale and an fp32 or fp16 offset per 32 inputs (Q4_0,
//   Q4_1 and Q4_K blocks, repacked). Decoding streams every weight once per token, so these
//   run at memory bandwidth. fp32 and bf16 use AVX2/FMA where the compiler targets it, plain loops
//   elsewhere; int8 and int4 pick AVX-512, AVX2 or portable code when called, by what the CPU
//   runs.
//   Rows of zeros are skipped.
// - attention of one query per sequence over a key/value cache that reads only the keys its
//   mask allows (the filled slots of a fixed-length cache), not the whole buffer.
//
// Built on first use by fusionlm/inference/cpu_kernels.py (torch.utils.cpp_extension) and
// called as torch.ops.fusionlm.linear_f32 / linear_bf16 / linear_int8 / linear_int4 /
// decode_attention.

#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FUSIONLM_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 32;  // inputs per int8 scale
// Runs [first, end) of consecutive rows of x that are not all zeros (`busy_runs`).
using Runs = std::vector<std::pair<int64_t, int64_t>>;
constexpr int64_t kGrain = 64;  // weight rows per parallel task, at least
// Decoding reads each weight once, so the bf16, int8 and int4 kernels, which spend more
// instructions per byte than the fp32 one, ask for weights this far ahead of use (1 KB beat
// 4 KB for bf16 and tied for int8; the fp32 kernel is faster without).
constexpr int64_t kPrefetchBytes = 1024;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

#ifdef FUSIONLM_AVX2
inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

inline __m256 load_bf16(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}


inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}
#endif

// The fp32 and bf16 weights' element access: as is, or widened from bf16.
inline float to_float(float value) { return value; }
inline float to_float(uint16_t bf16) { return bf16_to_float(bf16); }
inline float to_float(at::Half half) { return static_cast<float>(half); }
#ifdef FUSIONLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return load_bf16(p); }
inline __m256 load8(const at::Half* p) {  // 8 fp16 -> 8 fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Rows of x share each weight load in blocks of kBlockRows (AVX-512's 32 vector registers
// hold 4 rows' accumulators; AVX2's 16 hold 2): fewer loads per multiply, and independent
// sums to hide the multiply-add latency. Each row's sum runs in the same order in any block,
// so a row's result never depends on the other rows or on how many there are.
#ifdef __AVX512F__
constexpr int64_t kBlockRows = 4;
#else
constexpr int64_t kBlockRows = 2;
#endif

// The rows of a block starting with `remaining` rows left: max_block (kBlockRows or 2), else
// 2, else 1.
inline int64_t block_rows(int64_t remaining, int64_t max_block) {
  return remaining >= max_block ? max_block : remaining >= 2 ? 2 : 1;
}

// out[r * out_stride] = x[r * k_size, +k_size) . w for r < R, w fp32 or bf16 (uint16_t bits).
template <int R, typename Weight>
void dot_rows(const float* x, const Weight* w, int64_t k_size, float* out, int64_t out_stride) {
  int64_t k = 0;
  float total[R] = {};
#ifdef FUSIONLM_AVX2
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  for (; k + 32 <= k_size; k += 32) {
    if constexpr (std::is_same_v<Weight, uint16_t>) prefetch(w + k);
    const __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
    const __m256 w2 = load8(w + k + 16), w3 = load8(w + k + 24);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * k_size + k;
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r) {
    total[r] = horizontal_sum(
        _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
  }
#endif
  for (int r = 0; r < R; ++r) {
    for (int64_t t = k; t < k_size; ++t) total[r] += x[r * k_size + t] * to_float(w[t]);
    out[r * out_stride] = total[r];
  }
}

// x . w over k_size values.
template <typename Weight>
float dot(const float* x, const Weight* w, int64_t k_size) {
  float out;
  dot_rows<1>(x, w, k_size, &out, 1);
  return out;
}

// ----------------------------------------------------- int8 and int4, paths chosen at run time
// int8 weights: one fp32 scale per group of kGroup inputs, w = scale * q (llama.cpp's Q8_0).
// int4 weights: values q in [0, 15] in groups of kGroup inputs, w = scale * q + offset with one
// fp32 scale and one offset per group ([n, k / 32] each); offsets are fp32, or fp16 as Q4_0 and
// Q4_1 blocks store them (read a vector at a time, so widening them costs nothing). A group's
// 16 bytes hold input j in the low nibble of byte j and input j + 16 in its high nibble (ggml's
// Q4_0 / Q4_1 block order). Per row of x: x . w = sum over groups g of scale_g * (x_g . q_g) +
// offset_g * sum(x_g), where the group sums of x are computed once per call, so the inner loop
// only widens q and multiplies (int8 scales q first, once for a block of rows).
//
// Three paths, chosen per call by what the CPU runs (or forced by use_isa, for tests): AVX-512
// (16 lanes, up to 8 rows per block), AVX2 + FMA (8 lanes, 4 rows) and portable C++. The vector
// paths are cpu_group_kernels.h compiled twice, for each instruction set's `Vec`, by target
// pragmas, whatever -march the build machine has, so each can be tested wherever the CPU runs
// it.

using fusionlm_isa::active_isa;
using fusionlm_isa::cpu_runs;
using fusionlm_isa::forced_isa;
using fusionlm_isa::Isa;
using fusionlm_isa::kIsaNames;

// An offset as fp32: fp16 ones are held as their raw bits (uint16_t), widened exactly.
inline float offset_value(float value) { return value; }
inline float offset_value(uint16_t fp16) { return c10::detail::fp16_ieee_to_fp32_value(fp16); }

// out[r * out_stride] = row r of x [rows, groups * kGroup] times one int4 weight row, given the
// rows' group sums x_sums [rows, groups]; Offset: float, or uint16_t for fp16.
template <typename Offset>
using Int4Block = void (*)(int64_t rows, const float* x, const float* x_sums, const uint8_t* q,
                           const float* scale, const Offset* offset, int64_t groups, float* out,
                           int64_t out_stride);

// out[r * out_stride] = row r of x [rows, groups * kGroup] times one int8 weight row.
using Int8Block = void (*)(int64_t rows, const float* x, const int8_t* q, const float* scale,
                           int64_t groups, float* out, int64_t out_stride);

// Channels [first, end) of y [m, n] = x [m, k] @ W.T over the busy runs of rows of x, for an
// int8 weight (q [n, k], scale) or an int4 one (q [n, k / 2], scale, offset).
using Int8Tiles = void (*)(const float* x, const Runs& runs, int64_t k, int64_t n, int64_t first,
                           int64_t end, const int8_t* q, const float* scale, float* y);
template <typename Offset>
using Int4Tiles = void (*)(const float* x, const Runs& runs, int64_t k, int64_t n, int64_t first,
                           int64_t end, const uint8_t* q, const float* scale, const Offset* offset,
                           float* y);

void int8_block_scalar(int64_t rows, const float* x, const int8_t* q, const float* scale,
                       int64_t groups, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + (r * groups + g) * kGroup;
      float part = 0.0f;
      for (int64_t j = 0; j < kGroup; ++j) part += xg[j] * static_cast<float>(q[g * kGroup + j]);
      total += part * scale[g];
    }
    out[r * out_stride] = total;
  }
}

template <typename Offset>
void int4_block_scalar(int64_t rows, const float* x, const float* x_sums, const uint8_t* q,
                       const float* scale, const Offset* offset, int64_t groups, float* out,
                       int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* qg = q + g * (kGroup / 2);
      const float* xg = x + (r * groups + g) * kGroup;
      float part = 0.0f;
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        part += xg[j] * static_cast<float>(qg[j] & 0x0F) +
                xg[j + kGroup / 2] * static_cast<float>(qg[j] >> 4);
      }
      total += part * scale[g] + offset_value(offset[g]) * x_sums[r * groups + g];
    }
    out[r * out_stride] = total;
  }
}

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct Vec {
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxRows = 4;  // 2 x 4 accumulators + 4 weights of 16 registers
  static constexpr int kTileRows = 3, kTileChannels = 3;  // 3 x 3 accumulators + 3 weights
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float value) { return _mm256_set1_ps(value); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
  }
  static F load(const uint16_t* p) {  // 8 fp16
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F widen(__m128i bytes) {  // the low 8 unsigned bytes -> 8 fp32
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  }
  static void int8_group(const int8_t* q, F* w) {
    for (int v = 0; v < 4; ++v) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * v));
      w[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
  }
  static void int4_group(const uint8_t* q, F* w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
    w[0] = widen(lo);
    w[1] = widen(_mm_unpackhi_epi64(lo, lo));
    w[2] = widen(hi);
    w[3] = widen(_mm_unpackhi_epi64(hi, hi));
  }
};

#include "cpu_group_kernels.h"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma,f16c")
namespace avx512 {

struct Vec {
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 8;  // 2 x 8 accumulators + 2 weights of 32 registers
  static constexpr int kTileRows = 6, kTileChannels = 4;  // 6 x 4 accumulators + 4 weights
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F load(const uint16_t* p) {  // 16 fp16
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F set1(float value) { return _mm512_set1_ps(value); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  static void int8_group(const int8_t* q, F* w) {
    for (int v = 0; v < 2; ++v) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * v));
      w[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    }
  }
  static void int4_group(const uint8_t* q, F* w) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low4)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low4)));
  }
};

#include "cpu_group_kernels.h"

}  // namespace avx512
#pragma GCC pop_options
#endif

// An instruction set's int8 and int4 kernels (the latter for fp32 and fp16 offsets): matvec
// blocks, the rows of x such a block takes, and prompt tiles (none on the portable path).
struct GroupKernels {
  Int8Block int8;
  Int4Block<float> int4;
  Int4Block<uint16_t> int4_half_offsets;
  int64_t max_block;
  Int8Tiles int8_tiles = nullptr;
  Int4Tiles<float> int4_tiles = nullptr;
  Int4Tiles<uint16_t> int4_half_offset_tiles = nullptr;
};

GroupKernels group_kernels(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) {
    using namespace avx512;
    return {int8_block,  int4_block<float>,  int4_block<uint16_t>, Vec::kMaxRows,
            int8_tiles,  int4_tiles<float>,  int4_tiles<uint16_t>};
  }
  if (isa == Isa::kAvx2) {
    using namespace avx2;
    return {int8_block,  int4_block<float>,  int4_block<uint16_t>, Vec::kMaxRows,
            int8_tiles,  int4_tiles<float>,  int4_tiles<uint16_t>};
  }
#endif
  return {int8_block_scalar, int4_block_scalar<float>, int4_block_scalar<uint16_t>, kBlockRows};
}

// An int4 weight's offsets [n, groups], fp32 or fp16, checked.
struct Offsets {
  Offsets() = default;
  Offsets(const at::Tensor& t, int64_t n, int64_t groups) : groups(groups) {
    TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf) &&
                    t.is_contiguous() && t.dim() == 2 && t.size(0) == n && t.size(1) == groups,
                "each offset must be a contiguous float32 or float16 [", n, ", ", groups,
                "] tensor, got ", t.scalar_type(), " ", t.sizes());
    half = t.scalar_type() == at::kHalf;
    data = t.data_ptr();
  }
  // Row n's offsets: Offset is float for fp32, uint16_t (the bits) for fp16.
  template <typename Offset>
  const Offset* row(int64_t n) const {
    return static_cast<const Offset*>(data) + n * groups;
  }
  float at(int64_t index) const {
    return half ? offset_value(static_cast<const uint16_t*>(data)[index])
                : static_cast<const float*>(data)[index];
  }
  int64_t groups = 0;
  bool half = false;
  const void* data = nullptr;
};

// One block of `rows` rows (1, 2 or kBlockRows) through dot_rows.
template <typename Weight>
void dot_block(int64_t rows, const float* x, const Weight* w, int64_t k_size, float* out,
               int64_t out_stride) {
  if (rows == kBlockRows) {
    dot_rows<kBlockRows>(x, w, k_size, out, out_stride);
  } else if (rows == 2) {
    dot_rows<2>(x, w, k_size, out, out_stride);
  } else {
    dot_rows<1>(x, w, k_size, out, out_stride);
  }
}

// x must be [m, k] fp32, and every weight a contiguous [n_i, k] tensor of dtype.
void check_inputs(const at::Tensor& x, at::TensorList weights, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 [m, k] tensor");
  TORCH_CHECK(!weights.empty(), "give at least one weight");
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
                "each weight must be a contiguous [n, k] tensor with k = ", x.size(1));
    TORCH_CHECK(weight.scalar_type() == dtype, "weights must be ", dtype, ", got ",
                weight.scalar_type());
  }
}

// Whether row [0, k) holds only zeros (-0.0 included, NaN not), checked 16 values at a time.
bool all_zeros(const float* row, int64_t k) {
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    bool busy = false;
    for (int t = 0; t < 16; ++t) busy |= row[j + t] != 0.0f;
    if (busy) return false;
  }
  for (; j < k; ++j) {
    if (row[j] != 0.0f) return false;
  }
  return true;
}

// The runs [first, end) of consecutive rows of x [m, k] that are not all zeros. A busy row is
// found at its first values, almost always.
Runs busy_runs(const float* x, int64_t m_size, int64_t k_size) {
  Runs runs;
  for (int64_t m = 0; m < m_size; ++m) {
    if (all_zeros(x + m * k_size, k_size)) continue;
    if (!runs.empty() && runs.back().second == m) {
      ++runs.back().second;
    } else {
      runs.emplace_back(m, m + 1);
    }
  }
  return runs;
}

// The rows [0, m_size) outside the busy runs.
std::vector<int64_t> idle_rows(const Runs& runs, int64_t m_size) {
  std::vector<int64_t> idle;
  int64_t m = 0;
  for (const auto& [first, stop] : runs) {
    for (; m < first; ++m) idle.push_back(m);
    m = stop;
  }
  for (; m < m_size; ++m) idle.push_back(m);
  return idle;
}

// Columns [first, end) of the given rows of out [m, n] := 0: idle rows' outputs, written by
// the parallel task that owns those columns.
void zero_rows(float* out, int64_t n, int64_t first, int64_t end,
               const std::vector<int64_t>& rows) {
  for (const int64_t m : rows) std::fill(out + m * n + first, out + m * n + end, 0.0f);
}

// y_i[m, n] = row m of x times row n of weight i, for every weight, as one parallel pass over
// all the weights' rows (a layer's q, k and v projections share x). block_dot(rows, m, x, i,
// n, y, y_stride) computes a block of rows of x (block_rows, at most max_block) starting at row
// m for row n of weight i.
//
// Rows of x that are all zeros give rows of zeros without reading any weight (exact:
// 0 . w = 0): a server's idle batch rows carry zeros, so a decode step costs what its busy
// rows need. Blocks run within runs of busy rows, so skipping copies nothing (gathering the
// busy rows with ATen ops cost ~15 us a call, ~1.8 ms of a step of 8 rows with one busy).
template <typename BlockDot>
std::vector<at::Tensor> matvecs(const at::Tensor& x, at::TensorList weights,
                                BlockDot block_dot, int64_t max_block = kBlockRows) {
  const int64_t m_size = x.size(0), k_size = x.size(1);
  const float* xp = x.data_ptr<float>();
  const auto runs = busy_runs(xp, m_size, k_size);
  const auto idle = idle_rows(runs, m_size);
  std::vector<at::Tensor> outputs;
  std::vector<float*> out;
  std::vector<int64_t> first_row{0};  // weight i owns rows [first_row[i], first_row[i + 1])
  for (const auto& weight : weights) {
    outputs.push_back(at::empty({m_size, weight.size(0)}, x.options()));
    out.push_back(outputs.back().data_ptr<float>());
    first_row.push_back(first_row.back() + weight.size(0));
  }
  at::parallel_for(0, first_row.back(), kGrain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < weights.size(); ++i) {  // the part of [begin, end) in weight i
      const int64_t first = std::max(begin, first_row[i]) - first_row[i];
      const int64_t stop = std::min(end, first_row[i + 1]) - first_row[i];
      const int64_t n_size = first_row[i + 1] - first_row[i];
      if (first >= stop) continue;
      zero_rows(out[i], n_size, first, stop, idle);
      for (int64_t n = first; n < stop; ++n) {
        for (const auto& [run_first, run_stop] : runs) {
          for (int64_t m = run_first, rows = 0; m < run_stop; m += rows) {
            rows = block_rows(run_stop - m, max_block);
            block_dot(rows, m, xp + m * k_size, i, n, out[i] + m * n_size + n, n_size);
          }
        }
      }
    }
  });
  return outputs;
}

// Raw data pointers of same-dtype tensors (data_ptr<T> refuses another dtype).
template <typename T>
std::vector<const T*> pointers(at::TensorList tensors) {
  std::vector<const T*> result;
  for (const auto& t : tensors) result.push_back(t.data_ptr<T>());
  return result;
}

#ifdef FUSIONLM_AVX2
// exp of 8 values (Cephes' expf: a degree-5 polynomial on [-ln 2 / 2, ln 2 / 2] times a power
// of two; within 2 ulp of std::exp), for inputs below 88.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // exp(-87) ~ 1.6e-38: no denormals; NaN stays
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f}) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  }
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}
#endif

// w[i] := exp(w[i] - top) for i < n; returns their sum.
float exp_shifted(float* w, int64_t n, float top) {
#ifdef FUSIONLM_AVX2
  __m256 sum = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(top);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w + i), shift));
    _mm256_storeu_ps(w + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {  // the last values through a buffer: every value goes the same way
    float tail[8] = {};
    std::copy(w + i, w + n, tail);
    const __m256i used = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)),
                                   _mm256_castsi256_ps(used));
    _mm256_storeu_ps(tail, e);
    std::copy(tail, tail + (n - i), w + i);
    sum = _mm256_add_ps(sum, e);
  }
  return horizontal_sum(sum);
#else
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    w[i] = std::exp(w[i] - top);
    total += w[i];
  }
  return total;
#endif
}

// out[h][0, d) = sum over i < n of weight[h * n + i] * values[slot[i] * stride + (0, d)], for
// the G heads h < G that share these values: each value row is read once for all of them, and
// every head's sums run in slot order, as they would for that head alone.
template <int G, typename Value>
void weighted_sums(float* const* out, const float* weight, const int64_t* slot, int64_t n,
                   const Value* values, int64_t stride, int64_t d) {
  int64_t t = 0;
#ifdef FUSIONLM_AVX2
  for (; t + 32 <= d; t += 32) {  // 32 channels of every head in registers, one pass
    __m256 acc[G][4];
    for (int h = 0; h < G; ++h) {
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < n; ++i) {
      const Value* row = values + slot[i] * stride + t;
      const __m256 v0 = load8(row), v1 = load8(row + 8);
      const __m256 v2 = load8(row + 16), v3 = load8(row + 24);
      for (int h = 0; h < G; ++h) {
        const __m256 p = _mm256_set1_ps(weight[h * n + i]);
        acc[h][0] = _mm256_fmadd_ps(p, v0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(p, v1, acc[h][1]);
        acc[h][2] = _mm256_fmadd_ps(p, v2, acc[h][2]);
        acc[h][3] = _mm256_fmadd_ps(p, v3, acc[h][3]);
      }
    }
    for (int h = 0; h < G; ++h) {
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out[h] + t + 8 * j, acc[h][j]);
    }
  }
#endif
  for (; t < d; ++t) {
    for (int h = 0; h < G; ++h) {
      float total = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        total += weight[h * n + i] * to_float(values[slot[i] * stride + t]);
      }
      out[h][t] = total;
    }
  }
}

// softmax(q_h . k[slot[i]] * factor over i < n) @ v[slot[i]] into out[h], for the g query
// heads h < g that share one key/value head; `weight` holds g * n floats. Keys and values are
// read once for the group (in blocks of up to 3 heads, what the registers hold), and each
// head's result is the one it gets alone.
template <typename KV>
void attend_heads(const float* const* queries, int64_t g, const KV* keys, int64_t k_slot,
                  const KV* values, int64_t v_slot, const int64_t* slot, int64_t n,
                  int64_t d, float factor, float* weight, float* const* out) {
  if (n == 0) {  // no key to attend to
    for (int64_t h = 0; h < g; ++h) std::fill(out[h], out[h] + d, 0.0f);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const KV* key = keys + slot[i] * k_slot;
    for (int64_t h = 0; h < g; ++h) weight[h * n + i] = dot(queries[h], key, d) * factor;
  }
  for (int64_t h = 0; h < g; ++h) {
    float* w = weight + h * n;
    const float total = exp_shifted(w, n, *std::max_element(w, w + n));
    for (int64_t i = 0; i < n; ++i) w[i] /= total;
  }
  for (int64_t h = 0; h < g; h += 3) {
    const float* w = weight + h * n;
    switch (std::min<int64_t>(3, g - h)) {
      case 3: weighted_sums<3>(out + h, w, slot, n, values, v_slot, d); break;
      case 2: weighted_sums<2>(out + h, w, slot, n, values, v_slot, d); break;
      default: weighted_sums<1>(out + h, w, slot, n, values, v_slot, d); break;
    }
  }
}

}  // namespace

std::vector<at::Tensor> linear_f32(const at::Tensor& x, at::TensorList weights) {
  const int64_t k = x.size(-1);
  check_inputs(x, weights, at::kFloat);
  const auto w = pointers<float>(weights);
  return matvecs(x.contiguous(), weights,
                   [&](int64_t rows, int64_t, const float* x_rows, size_t i, int64_t n,
                       float* y, int64_t y_stride) {
                     dot_block(rows, x_rows, w[i] + n * k, k, y, y_stride);
                   });
}

std::vector<at::Tensor> linear_bf16(const at::Tensor& x, at::TensorList weights) {
  const int64_t k = x.size(-1);
  check_inputs(x, weights, at::kBFloat16);
  const auto w = pointers<at::BFloat16>(weights);
  return matvecs(x.contiguous(), weights,
                   [&](int64_t rows, int64_t, const float* x_rows, size_t i, int64_t n,
                       float* y, int64_t y_stride) {
                     const auto* w_row = reinterpret_cast<const uint16_t*>(w[i] + n * k);
                     dot_block(rows, x_rows, w_row, k, y, y_stride);
                   });
}

// An int8 weight (weight int8 [n, k], scale fp32 [n, k / 32]: w = scale * q) or an int4 one
// (weight uint8 [n, k / 2], scale and offset [n, k / 32]: w = scale * q + offset), checked.
struct QuantizedWeight {
  QuantizedWeight(const at::Tensor& weight, const at::Tensor& scale,
                  const std::optional<at::Tensor>& offset)
      : int4(offset.has_value()) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                    weight.scalar_type() == (int4 ? at::kByte : at::kChar),
                "weight must be a contiguous ", int4 ? "uint8 [n, k / 2]" : "int8 [n, k]",
                " tensor, got ", weight.scalar_type(), " ", weight.sizes());
    n = weight.size(0);
    k = int4 ? 2 * weight.size(1) : weight.size(1);
    groups = k / kGroup;
    TORCH_CHECK(k % kGroup == 0, "k must be a multiple of ", kGroup, ", got ", k);
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                    scale.dim() == 2 && scale.size(0) == n && scale.size(1) == groups,
                "scale must be a contiguous float32 [", n, ", ", groups, "] tensor");
    q = weight.data_ptr();
    this->scale = scale.data_ptr<float>();
    if (int4) offsets = Offsets(*offset, n, groups);
  }
  const int8_t* q8() const { return static_cast<const int8_t*>(q); }
  const uint8_t* q4() const { return static_cast<const uint8_t*>(q); }
  bool int4;
  int64_t n = 0, k = 0, groups = 0;
  const void* q = nullptr;
  const float* scale = nullptr;
  Offsets offsets;  // int4 only
};

std::vector<at::Tensor> linear_int8(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList scales) {
  check_inputs(x, weights, at::kChar);
  TORCH_CHECK(scales.size() == weights.size(), "give one scale per weight");
  std::vector<QuantizedWeight> w;
  for (size_t i = 0; i < weights.size(); ++i) w.emplace_back(weights[i], scales[i], std::nullopt);
  const GroupKernels kernels = group_kernels(active_isa());
  const int64_t k = x.size(-1), groups = k / kGroup;
  return matvecs(
      x.contiguous(), weights,
      [&](int64_t rows, int64_t, const float* x_rows, size_t i, int64_t n, float* y,
          int64_t y_stride) {
        kernels.int8(rows, x_rows, w[i].q8() + n * k, w[i].scale + n * groups, groups, y,
                     y_stride);
      },
      kernels.max_block);
}

std::vector<at::Tensor> linear_int4(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList scales, at::TensorList offsets) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 [m, k] tensor");
  const int64_t k = x.size(1), groups = k / kGroup;
  TORCH_CHECK(!weights.empty() && scales.size() == weights.size() &&
                  offsets.size() == weights.size(),
              "give at least one weight, and one scale and one offset per weight");
  std::vector<QuantizedWeight> w;
  for (size_t i = 0; i < weights.size(); ++i) {
    w.emplace_back(weights[i], scales[i], offsets[i]);
    TORCH_CHECK(w.back().k == k, "each weight must be a uint8 [n, k / 2] tensor with k = ", k,
                ", got ", weights[i].sizes());
  }
  const GroupKernels kernels = group_kernels(active_isa());
  const auto input = x.contiguous();
  const int64_t m_size = input.size(0);
  const float* xp = input.data_ptr<float>();
  std::vector<float> x_sums(m_size * groups);
  for (int64_t g = 0; g < m_size * groups; ++g) {
    x_sums[g] = std::accumulate(xp + g * kGroup, xp + (g + 1) * kGroup, 0.0f);
  }
  return matvecs(
      input, weights,
      [&](int64_t rows, int64_t m, const float* x_rows, size_t i, int64_t n, float* y,
          int64_t y_stride) {
        const float* sums = x_sums.data() + m * groups;
        const uint8_t* q = w[i].q4() + n * (k / 2);
        const float* scale = w[i].scale + n * groups;
        if (w[i].offsets.half) {
          kernels.int4_half_offsets(rows, x_rows, sums, q, scale, w[i].offsets.row<uint16_t>(n),
                                    groups, y, y_stride);
        } else {
          kernels.int4(rows, x_rows, sums, q, scale, w[i].offsets.row<float>(n), groups, y,
                       y_stride);
        }
      },
      kernels.max_block);
}

// The fp32 weight of an int8 or int4 layer, in one pass where PyTorch ops took four over the
// weight (unpack, widen, scale, offset). Each value is one multiply then one add, never
// fused, as the GGML dequantizers compute it, so the result equals theirs bit for bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& offset) {
  const QuantizedWeight w(weight, scale, offset);
  auto out = at::empty({w.n, w.k}, scale.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.n * w.groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      float* values = op + g * kGroup;
      const float s = w.scale[g];
      if (!w.int4) {
        const int8_t* q = w.q8() + g * kGroup;
        for (int64_t j = 0; j < kGroup; ++j) values[j] = static_cast<float>(q[j]) * s;
        continue;
      }
      const uint8_t* bytes = w.q4() + g * (kGroup / 2);
      const float shift = w.offsets.at(g);
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        const float low = static_cast<float>(bytes[j] & 0x0F) * s;
        const float high = static_cast<float>(bytes[j] >> 4) * s;
        values[j] = low + shift;
        values[j + kGroup / 2] = high + shift;
      }
    }
  });
  return out;
}
#pragma GCC pop_options

// y [m, n] = x [m, k] fp32 @ W.T for an int8 or int4 weight W (see QuantizedWeight), W
// dequantized a few channels at a time into a buffer every row of x is multiplied by: for a
// prompt's rows, which share each weight (see cpu_group_kernels.h). Rows of zeros give zeros.
// Each row's result depends only on that row. The portable path multiplies by `dequantize`.
at::Tensor linear_tiled(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const std::optional<at::Tensor>& offset) {
  const QuantizedWeight w(weight, scale, offset);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == w.k,
              "x must be a float32 [m, ", w.k, "] tensor, got ", x.scalar_type(), " ", x.sizes());
  const GroupKernels kernels = group_kernels(active_isa());
  if (kernels.int8_tiles == nullptr) return at::mm(x, dequantize(weight, scale, offset).t());
  const auto input = x.contiguous();
  const float* xp = input.data_ptr<float>();
  const Runs runs = busy_runs(xp, input.size(0), w.k);
  const auto idle = idle_rows(runs, input.size(0));
  auto output = at::empty({input.size(0), w.n}, input.options());
  float* y = output.data_ptr<float>();
  at::parallel_for(0, w.n, kGrain, [&](int64_t first, int64_t end) {
    zero_rows(y, w.n, first, end, idle);
    if (!w.int4) {
      kernels.int8_tiles(xp, runs, w.k, w.n, first, end, w.q8(), w.scale, y);
    } else if (w.offsets.half) {
      kernels.int4_half_offset_tiles(xp, runs, w.k, w.n, first, end, w.q4(), w.scale,
                                     w.offsets.row<uint16_t>(0), y);
    } else {
      kernels.int4_tiles(xp, runs, w.k, w.n, first, end, w.q4(), w.scale,
                         w.offsets.row<float>(0), y);
    }
  });
  return output;
}

// The kernel paths this CPU runs, fastest first ("avx512", "avx2", "scalar").
std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
    if (cpu_runs(isa)) names.emplace_back(kIsaNames[static_cast<int>(isa)]);
  }
  return names;
}

// Run the dispatched kernels on path `name` from now on ("auto": the fastest the CPU runs);
// returns the previous setting. For tests and measurements.
std::string use_isa(const std::string& name) {
  int wanted = -1;
  for (int isa = 0; isa < 3; ++isa) {
    if (name == kIsaNames[isa]) wanted = isa;
  }
  TORCH_CHECK(wanted >= 0 || name == "auto", "unknown kernel path '", name,
              "'; choose auto, avx512, avx2 or scalar");
  TORCH_CHECK(wanted < 0 || cpu_runs(static_cast<Isa>(wanted)), "this CPU cannot run the ",
              name, " kernels");
  const int previous = forced_isa.exchange(wanted);
  return previous < 0 ? "auto" : kIsaNames[previous];
}

namespace {

// slots := the j < s with allow[j * stride], in order; a contiguous mask is read 8 slots at
// a time, skipping the runs of unfilled slots a fixed-length cache's mask is mostly made of.
void allowed_slots(const bool* allow, int64_t s, int64_t stride, std::vector<int64_t>& slots) {
  int64_t j = 0;
  if (stride == 1) {
    for (; j + 8 <= s; j += 8) {
      uint64_t word;
      std::memcpy(&word, allow + j, sizeof word);
      if (word == 0) continue;
      for (int64_t t = j; t < j + 8; ++t) {
        if (allow[t]) slots.push_back(t);
      }
    }
  }
  for (; j < s; ++j) {
    if (allow[j * stride]) slots.push_back(j);
  }
}

}  // namespace

// softmax(q . k[j] * scale over the keys j the mask allows) @ v, for each query of each (row,
// head): a decode step's one query per row, or a prompt's chunk over its row's cache. A
// query's head shares key/value head head / (h / h_kv) (grouped-query attention). Keys the
// mask excludes are never read, so a fixed-length cache costs what it holds, and a query with
// no allowed key gets zeros. Each query's result depends on its own allowed keys alone, read
// in slot order: the same in whatever chunk of a prompt, or step, it comes.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be [b, h, s_q, d], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k and v must be [b, h_kv, s, d], got ",
              k.sizes(), " and ", v.sizes());
  const int64_t b = q.size(0), h = q.size(1), queries = q.size(2), d = q.size(3);
  const int64_t h_kv = k.size(1), s = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && h % h_kv == 0,
              "k and v [b, h_kv, s, d] do not fit q ", q.sizes(), ": got ", k.sizes());
  const bool half = k.scalar_type() == at::kHalf;
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == k.scalar_type() &&
                  (half || k.scalar_type() == at::kFloat),
              "q must be float32, and k and v both float32 or both float16; got ",
              q.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1, "q, k and v must have contiguous rows");
  }
  // The mask's strides over [b, h, s_q, s], 0 along a dimension it broadcasts (no copy).
  const bool* mp = nullptr;
  int64_t m_row = 0, m_head = 0, m_query = 0, m_slot = 0;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 &&
                    (m.size(0) == 1 || m.size(0) == b) && (m.size(1) == 1 || m.size(1) == h) &&
                    (m.size(2) == 1 || m.size(2) == queries) && m.size(3) == s,
                "mask must be bool [1 or b, 1 or h, 1 or s_q, s] with b=", b, ", h=", h,
                ", s_q=", queries, ", s=", s, ", got ", m.scalar_type(), " ", m.sizes());
    mp = m.data_ptr<bool>();
    m_row = m.size(0) == 1 ? 0 : m.stride(0);
    m_head = m.size(1) == 1 ? 0 : m.stride(1);
    m_query = m.size(2) == 1 ? 0 : m.stride(2);
    m_slot = m.stride(3);
  }
  auto out = at::empty({b, h, queries, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const void* kp = k.data_ptr();  // float or at::Half: strides count elements either way
  const void* vp = v.data_ptr();
  float* op = out.data_ptr<float>();
  // Strides as plain integers: Tensor::stride() is a call, too slow for the inner loops.
  const int64_t q_row = q.stride(0), q_head = q.stride(1), q_query = q.stride(2);
  const int64_t k_row = k.stride(0), k_head = k.stride(1), k_slot = k.stride(2);
  const int64_t v_row = v.stride(0), v_head = v.stride(1), v_slot = v.stride(2);
  const int64_t group = h / h_kv;
  const float factor = static_cast<float>(scale);
  // A mask shared by the heads is read once per (row, query), not once per head: the slots
  // each may read, in order (a fixed-length cache's mask is mostly unfilled slots). No mask:
  // every slot, for every (row, query).
  std::vector<std::vector<int64_t>> query_slots;
  const int64_t mask_rows = m_row == 0 ? 1 : b, mask_queries = m_query == 0 ? 1 : queries;
  if (mp == nullptr) {
    query_slots.assign(1, std::vector<int64_t>(s));
    std::iota(query_slots[0].begin(), query_slots[0].end(), 0);
  } else if (m_head == 0) {
    query_slots.resize(mask_rows * mask_queries);
    at::parallel_for(0, query_slots.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        allowed_slots(mp + i / mask_queries * m_row + i % mask_queries * m_query, s, m_slot,
                      query_slots[i]);
      }
    });
  }
  // A task attends one query of `heads` heads of a row that share a key/value head and the
  // slots they read: the whole group while there are tasks enough for every thread, else one
  // head (a batch of one row has few groups). The numbers are the same either way.
  const bool same_slots = !query_slots.empty();
  const int64_t heads =
      same_slots && b * h_kv * queries >= 4 * at::get_num_threads() ? group : 1;
  const int64_t head_tasks = h / heads;
  at::parallel_for(0, b * queries * head_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(heads * s);
    std::vector<int64_t> head_slots;  // a per-head mask's
    std::vector<const float*> inputs(heads);
    std::vector<float*> results(heads);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / (queries * head_tasks);
      const int64_t query = task / head_tasks % queries;
      const int64_t first = task % head_tasks * heads, kv_head = first / group;
      for (int64_t i = 0; i < heads; ++i) {
        inputs[i] = qp + row * q_row + (first + i) * q_head + query * q_query;
        results[i] = op + ((row * h + first + i) * queries + query) * d;
      }
      const std::vector<int64_t>* allowed = &head_slots;
      if (same_slots) {
        allowed = &query_slots[(m_row == 0 ? 0 : row) * mask_queries + (m_query == 0 ? 0 : query)];
      } else {
        head_slots.clear();
        allowed_slots(mp + row * m_row + first * m_head + query * m_query, s, m_slot, head_slots);
      }
      const int64_t* slots = allowed->data();
      const auto n = static_cast<int64_t>(allowed->size());
      const int64_t k_at = row * k_row + kv_head * k_head, v_at = row * v_row + kv_head * v_head;
      if (half) {
        attend_heads(inputs.data(), heads, static_cast<const at::Half*>(kp) + k_at, k_slot,
                     static_cast<const at::Half*>(vp) + v_at, v_slot, slots, n, d, factor,
                     weight.data(), results.data());
      } else {
        attend_heads(inputs.data(), heads, static_cast<const float*>(kp) + k_at, k_slot,
                     static_cast<const float*>(vp) + v_at, v_slot, slots, n, d, factor,
                     weight.data(), results.data());
      }
    }
  });
  return out;
}

// Registered with PyTorch's dispatcher, so compiled graphs call them without Python.
TORCH_LIBRARY(fusionlm, m) {
  // x [m, k] fp32 @ weights[i] [n_i, k] fp32 .T -> [m, n_i] fp32, for each i
  m.def("linear_f32(Tensor x, Tensor[] weights) -> Tensor[]");
  // x [m, k] fp32 @ weights[i] [n_i, k] bf16 .T -> [m, n_i] fp32
  m.def("linear_bf16(Tensor x, Tensor[] weights) -> Tensor[]");
  // x [m, k] fp32 @ (weights[i] [n_i, k] int8 * scales[i] [n_i, k / 32], per group of 32
  // inputs).T -> [m, n_i] fp32
  m.def("linear_int8(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor[]");
  // x [m, k] fp32 @ (weights[i] [n_i, k / 2] uint8, two int4 values a byte, * scales[i] +
  // offsets[i], [n_i, k / 32] each, fp32 (offsets: or fp16), per group of 32 inputs).T ->
  // [m, n_i] fp32
  m.def("linear_int4(Tensor x, Tensor[] weights, Tensor[] scales, Tensor[] offsets) -> Tensor[]");
  // The int4 kernel's paths this CPU runs, fastest first; use_isa(name or "auto") picks one
  // and returns the previous choice.
  // int8 weight [n, k] and scale, or int4 weight [n, k / 2], scale and offset -> fp32 [n, k]
  m.def("dequantize(Tensor weight, Tensor scale, Tensor? offset) -> Tensor");
  // x [m, k] fp32 @ (int8 or int4 weight, scale, offset as for dequantize, fp32 [n, k]).T ->
  // [m, n] fp32, for a prompt's rows
  m.def("linear_tiled(Tensor x, Tensor weight, Tensor scale, Tensor? offset) -> Tensor");
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("use_isa(str isa) -> str", &use_isa);
  // q [b, h, s_q, d] fp32, k and v [b, h_kv, s, d] fp32 or fp16, mask None or bool [1 or b,
  // 1 or h, 1 or s_q, s] (True = may attend) -> [b, h, s_q, d] fp32
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusionlm, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize", &dequantize);
  m.impl("linear_tiled", &linear_tiled);
  m.impl("decode_attention", &decode_attention);
}
