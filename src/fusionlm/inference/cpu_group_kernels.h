// The int8 and int4 kernels, for decoding (matvecs) and for prompts (tiles), written once over
// a vector type: cpu_kernels.cpp includes this file once per instruction set, inside that
// set's namespace and target pragma, after defining `Vec` there:
//   F                           the vector of kLanes floats
//   kLanes, kMaxRows            lanes per vector; rows of x per matvec block
//   kTileRows, kTileChannels    rows of x and weight channels per tile block
//   zero, load (kLanes floats, or kLanes fp16 widened), store, set1, add, mul, fma, sum (of
//   the lanes)
//   int8_group(q, w), int4_group(q, w)
//                               a group's kGroup weights as kGroup / kLanes vectors of floats
// Within a row, groups alternate between two accumulators, so consecutive groups'
// multiply-adds do not wait on each other; each row sums in the same order in any block.

constexpr int kVecs = kGroup / Vec::kLanes;  // vectors per group

// One offset as fp32: a float as it is, fp16 bits widened (F16C, which the target includes).
inline float widened(float value) { return value; }
inline float widened(uint16_t fp16) { return _cvtsh_ss(fp16); }

// acc[r][slot] += scale * (row r of x's group g . w), for the R rows of a block. With
// kScaleWeights the group's weights are scaled once for all rows, then one multiply-add per
// vector and row (int8: faster at 1 row and at 8); else each row's product is scaled (int4,
// whose weights take more instructions to widen: a lone row, a decode step's usual case,
// ran 9% slower with them scaled, 8 rows 8% faster).
template <int R, bool kScaleWeights>
inline void add_group(const float* x, int64_t groups, int64_t g, typename Vec::F* w,
                      float scale, typename Vec::F (&acc)[R][2], int slot) {
  const typename Vec::F group_scale = Vec::set1(scale);
  if constexpr (kScaleWeights) {
    for (int v = 0; v < kVecs; ++v) w[v] = Vec::mul(w[v], group_scale);
  }
  for (int r = 0; r < R; ++r) {
    const float* xg = x + (r * groups + g) * kGroup;
    if constexpr (kScaleWeights) {
      for (int v = 0; v < kVecs; ++v) {
        acc[r][slot] = Vec::fma(Vec::load(xg + v * Vec::kLanes), w[v], acc[r][slot]);
      }
    } else {
      typename Vec::F p = Vec::mul(Vec::load(xg), w[0]);
      for (int v = 1; v < kVecs; ++v) p = Vec::fma(Vec::load(xg + v * Vec::kLanes), w[v], p);
      acc[r][slot] = Vec::fma(p, group_scale, acc[r][slot]);
    }
  }
}

// The block's rows' sums over every group, weights from load_group(g, w); acc[r] summed.
template <int R, bool kScaleWeights, typename LoadGroup>
inline void sum_groups(const float* x, const float* scale, int64_t groups, LoadGroup load_group,
                       typename Vec::F (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec::zero();
  typename Vec::F w[kVecs];
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    load_group(g, w);
    add_group<R, kScaleWeights>(x, groups, g, w, scale[g], acc, 0);
    load_group(g + 1, w);
    add_group<R, kScaleWeights>(x, groups, g + 1, w, scale[g + 1], acc, 1);
  }
  if (g < groups) {
    load_group(g, w);
    add_group<R, kScaleWeights>(x, groups, g, w, scale[g], acc, 0);
  }
}

template <int R>
void int8_rows(const float* x, const int8_t* q, const float* scale, int64_t groups, float* out,
               int64_t out_stride) {
  typename Vec::F acc[R][2];
  sum_groups<R, true>(x, scale, groups, [&](int64_t g, typename Vec::F* w) {
    const int8_t* qg = q + g * kGroup;
    _mm_prefetch(reinterpret_cast<const char*>(qg) + kPrefetchBytes, _MM_HINT_T0);
    Vec::int8_group(qg, w);
  }, acc);
  for (int r = 0; r < R; ++r) out[r * out_stride] = Vec::sum(Vec::add(acc[r][0], acc[r][1]));
}

// Offset: float, or uint16_t holding fp16 (widened as loaded).
template <int R, typename Offset>
void int4_rows(const float* x, const float* x_sums, const uint8_t* q, const float* scale,
               const Offset* offset, int64_t groups, float* out, int64_t out_stride) {
  typename Vec::F acc[R][2];
  sum_groups<R, false>(x, scale, groups, [&](int64_t g, typename Vec::F* w) {
    const uint8_t* qg = q + g * (kGroup / 2);
    _mm_prefetch(reinterpret_cast<const char*>(qg) + kPrefetchBytes, _MM_HINT_T0);
    Vec::int4_group(qg, w);
  }, acc);
  for (int r = 0; r < R; ++r) {  // + sum over groups of offset * (the group's sum of x)
    const float* sums = x_sums + r * groups;
    typename Vec::F offsets = Vec::zero();
    int64_t g = 0;
    for (; g + Vec::kLanes <= groups; g += Vec::kLanes) {
      offsets = Vec::fma(Vec::load(offset + g), Vec::load(sums + g), offsets);
    }
    float total = Vec::sum(Vec::add(Vec::add(acc[r][0], acc[r][1]), offsets));
    for (; g < groups; ++g) total += widened(offset[g]) * sums[g];
    out[r * out_stride] = total;
  }
}

void int8_block(int64_t rows, const float* x, const int8_t* q, const float* scale, int64_t groups,
                float* out, int64_t out_stride) {
  switch (rows) {
    case Vec::kMaxRows: return int8_rows<Vec::kMaxRows>(x, q, scale, groups, out, out_stride);
    case 2: return int8_rows<2>(x, q, scale, groups, out, out_stride);
    default: return int8_rows<1>(x, q, scale, groups, out, out_stride);
  }
}

template <typename Offset>
void int4_block(int64_t rows, const float* x, const float* x_sums, const uint8_t* q,
                const float* scale, const Offset* offset, int64_t groups, float* out,
                int64_t out_stride) {
  switch (rows) {
    case Vec::kMaxRows:
      return int4_rows<Vec::kMaxRows>(x, x_sums, q, scale, offset, groups, out, out_stride);
    case 2: return int4_rows<2>(x, x_sums, q, scale, offset, groups, out, out_stride);
    default: return int4_rows<1>(x, x_sums, q, scale, offset, groups, out, out_stride);
  }
}

// ---------------------------------------------------------------- prompts: tiles of channels
// A prompt's many rows share each weight, so its int8 and int4 weights are dequantized a few
// channels at a time (Vec::kTileChannels rows, bit for bit as `dequantize` computes them: one
// multiply, then one add, never fused) into a buffer the L1 cache holds, and every row of x
// is multiplied by it: two multiply-adds per 32 inputs and row, and the weights widened once
// per call, where the streaming kernels widen them again for every block of a few rows.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// tile [c, +k) = channel c of an int8 weight (q [channels, k], scale [channels, groups]).
inline void int8_tile(const int8_t* q, const float* scale, int64_t groups, int channels,
                      float* tile) {
  typename Vec::F w[kVecs];
  for (int64_t g = 0; g < channels * groups; ++g) {
    Vec::int8_group(q + g * kGroup, w);
    const typename Vec::F s = Vec::set1(scale[g]);
    for (int v = 0; v < kVecs; ++v) {
      Vec::store(tile + g * kGroup + v * Vec::kLanes, Vec::mul(w[v], s));
    }
  }
}

// tile [c, +k) = channel c of an int4 weight (q [channels, k / 2], scale and offset
// [channels, groups]); Offset: float, or uint16_t holding fp16.
template <typename Offset>
inline void int4_tile(const uint8_t* q, const float* scale, const Offset* offset, int64_t groups,
                      int channels, float* tile) {
  typename Vec::F w[kVecs];
  for (int64_t g = 0; g < channels * groups; ++g) {
    Vec::int4_group(q + g * (kGroup / 2), w);
    const typename Vec::F s = Vec::set1(scale[g]), shift = Vec::set1(widened(offset[g]));
    for (int v = 0; v < kVecs; ++v) {
      Vec::store(tile + g * kGroup + v * Vec::kLanes, Vec::add(Vec::mul(w[v], s), shift));
    }
  }
}
#pragma GCC pop_options

// out[r * out_stride + c] = row r of x [R, k] . row c of tile [C, k]: lane l of each sum
// adds the inputs l, l + kLanes, ... in order, then the lanes are summed, so a row's result
// depends neither on the other rows nor on the block it is computed in.
template <int R, int C>
inline void tile_block(const float* x, const float* tile, int64_t k, float* out,
                       int64_t out_stride) {
  typename Vec::F acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::zero();
  }
  for (int64_t j = 0; j < k; j += Vec::kLanes) {
    typename Vec::F w[C];
    for (int c = 0; c < C; ++c) w[c] = Vec::load(tile + c * k + j);
    for (int r = 0; r < R; ++r) {
      const typename Vec::F xr = Vec::load(x + r * k + j);
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::fma(xr, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) out[r * out_stride + c] = Vec::sum(acc[r][c]);
  }
}

// tile_block<R, C> for the R < kMax rows left after the full blocks.
template <int kMax, int C>
inline void last_rows(int64_t rows, const float* x, const float* tile, int64_t k, float* out,
                      int64_t out_stride) {
  if constexpr (kMax > 1) {
    if (rows == kMax - 1) return tile_block<kMax - 1, C>(x, tile, k, out, out_stride);
    last_rows<kMax - 1, C>(rows, x, tile, k, out, out_stride);
  }
}

// tile_block over `rows` rows of x and the C channels of tile.
template <int C>
inline void tile_rows_of(int64_t rows, const float* x, const float* tile, int64_t k, float* out,
                         int64_t out_stride) {
  constexpr int kRows = Vec::kTileRows;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    tile_block<kRows, C>(x + r * k, tile, k, out + r * out_stride, out_stride);
  }
  last_rows<kRows, C>(rows - r, x + r * k, tile, k, out + r * out_stride, out_stride);
}

// out[r * out_stride + c] = row r of x [rows, k] . row c of tile [channels, k], for any rows
// and channels up to Vec::kTileChannels: blocks of Vec::kTileRows rows, then one of the rest.
inline void tile_rows(int64_t rows, const float* x, const float* tile, int channels, int64_t k,
                      float* out, int64_t out_stride) {
  constexpr int kChannels = Vec::kTileChannels;
  if (channels < kChannels) {  // the weight's last channels
    for (int c = 0; c < channels; ++c) {
      tile_rows_of<1>(rows, x, tile + c * k, k, out + c, out_stride);
    }
    return;
  }
  tile_rows_of<kChannels>(rows, x, tile, k, out, out_stride);
}

// Channels [first, end) of y [m, n] = x [m, k] @ W.T, over the busy runs of rows of x, where
// make_tile(c, channels, tile) dequantizes W's channels [c, c + channels) into tile.
template <typename MakeTile>
inline void tiles(const float* x, const Runs& runs, int64_t k, int64_t n, int64_t first,
                  int64_t end, MakeTile make_tile, float* y) {
  std::vector<float> tile(Vec::kTileChannels * k);
  for (int64_t c = first; c < end; c += Vec::kTileChannels) {
    const int channels = static_cast<int>(std::min<int64_t>(Vec::kTileChannels, end - c));
    make_tile(c, channels, tile.data());
    for (const auto& [row, stop] : runs) {
      tile_rows(stop - row, x + row * k, tile.data(), channels, k, y + row * n + c, n);
    }
  }
}

void int8_tiles(const float* x, const Runs& runs, int64_t k, int64_t n, int64_t first,
                int64_t end, const int8_t* q, const float* scale, float* y) {
  const int64_t groups = k / kGroup;
  tiles(x, runs, k, n, first, end, [&](int64_t c, int channels, float* tile) {
    int8_tile(q + c * k, scale + c * groups, groups, channels, tile);
  }, y);
}

template <typename Offset>
void int4_tiles(const float* x, const Runs& runs, int64_t k, int64_t n, int64_t first,
                int64_t end, const uint8_t* q, const float* scale, const Offset* offset,
                float* y) {
  const int64_t groups = k / kGroup;
  tiles(x, runs, k, n, first, end, [&](int64_t c, int channels, float* tile) {
    int4_tile(q + c * (k / 2), scale + c * groups, offset + c * groups, groups, channels, tile);
  }, y);
}
