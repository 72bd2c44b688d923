// The int8 and int4 matvec kernels, written once over a vector type: cpu_kernels.cpp includes
// this file once per instruction set, inside that set's namespace and target pragma, after
// defining `Vec` there:
//   F                           the vector of kLanes floats
//   kLanes, kMaxRows            lanes per vector; rows of x per block (accumulators that fit)
//   zero, load (kLanes floats, or kLanes fp16 widened), set1, add, mul, fma, sum (of the lanes)
//   int8_group(q, w), int4_group(q, w)
//                               a group's kGroup weights as kGroup / kLanes vectors of floats
// Within a row, groups alternate between two accumulators, so consecutive groups'
// multiply-adds do not wait on each other; each row sums in the same order in any block.

constexpr int kVecs = kGroup / Vec::kLanes;  // vectors per group

// One offset as fp32: a float as it is, fp16 bits widened (F16C, which the target includes).
inline float widened(float value) { return value; }
inline float widened(uint16_t fp16) { return _cvtsh_ss(fp16); }

// acc[r][slot] += scale * (row r of x's group g . w), for the R rows of a block.
template <int R>
inline void add_group(const float* x, int64_t groups, int64_t g, const typename Vec::F* w,
                      float scale, typename Vec::F (&acc)[R][2], int slot) {
  const typename Vec::F group_scale = Vec::set1(scale);
  for (int r = 0; r < R; ++r) {
    const float* xg = x + (r * groups + g) * kGroup;
    typename Vec::F p = Vec::mul(Vec::load(xg), w[0]);
    for (int v = 1; v < kVecs; ++v) p = Vec::fma(Vec::load(xg + v * Vec::kLanes), w[v], p);
    acc[r][slot] = Vec::fma(p, group_scale, acc[r][slot]);
  }
}

// The block's rows' sums over every group, weights from load_group(g, w); acc[r] summed.
template <int R, typename LoadGroup>
inline void sum_groups(const float* x, const float* scale, int64_t groups, LoadGroup load_group,
                       typename Vec::F (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec::zero();
  typename Vec::F w[kVecs];
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    load_group(g, w);
    add_group<R>(x, groups, g, w, scale[g], acc, 0);
    load_group(g + 1, w);
    add_group<R>(x, groups, g + 1, w, scale[g + 1], acc, 1);
  }
  if (g < groups) {
    load_group(g, w);
    add_group<R>(x, groups, g, w, scale[g], acc, 0);
  }
}

template <int R>
void int8_rows(const float* x, const int8_t* q, const float* scale, int64_t groups, float* out,
               int64_t out_stride) {
  typename Vec::F acc[R][2];
  sum_groups<R>(x, scale, groups, [&](int64_t g, typename Vec::F* w) {
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
  sum_groups<R>(x, scale, groups, [&](int64_t g, typename Vec::F* w) {
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
