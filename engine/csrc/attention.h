// Causal attention over the paged KV cache, the same arithmetic for every query row wherever it
// is computed (a prompt in one step, in chunks on top of cached blocks, or a decode step):
//
// - a query row (one token, one head) attends over the keys at positions 0..its own, taken in
//   tiles of KT keys at fixed absolute positions (tile j: keys KT*j .. KT*j + KT - 1);
// - per tile: scores s = (q . k) * scale * log2(e) in fp32 (bf16 pairs accumulated over
//   head_dim in order), keys after the row's position masked to -inf; online softmax in base 2
//   with m (running max), l (running sum: the tile's 2^(s - m) added key by key in order),
//   O = O * alpha + P V with P rounded to bf16 and V's keys taken in pairs in order;
// - out = bf16(O / l).
//
// A tile whose keys are all masked for a row leaves that row's m, l and O bit for bit as they
// were (alpha = exp(0) = 1, P = 0), and masked keys inside a tile add exact zeros, so the
// result of a row does not depend on which other rows (tokens, sequences) a work item holds,
// nor on the threads. Rows lie along vector lanes: query rows of one KV head's group, packed as
// bf16 pairs; K and V are read straight from the cache rows.

constexpr int64_t KT = 32;  // keys per tile
// Keys whose exponentials a prompt item's softmax steps side by side (vexp2_n): 4 independent chains
// hide the polynomial's latency; 8 spilled registers (Zen 4, 2-core A/B on a 1024-token chunk: 4 and 2
// keys 0.90-0.97x the time of 8).
constexpr int EXP_KEYS = 4;
constexpr int64_t ITEM_ROWS = 96;  // query rows per work item at most (6 groups of 16)

struct AttnScratch {
  std::vector<uint32_t> qp, pp, vp;
  std::vector<float> s, o, state;
  std::vector<int32_t> qpos;
  std::vector<bf16> zeros;
  std::vector<const bf16*> src;  // the item's query rows (width of them, padding rows: zeros)
  std::vector<bf16*> dst;        // the item's output rows
};

// s[rg][key][lane] = q_row . k_key for 8 keys and NRG row groups of 16 rows (qp: rg_count groups
// wide; s: the first group's first key, groups KT keys apart).
template <int NRG>
static inline void score_block(const uint32_t* qp, int64_t rg_count, const bf16* const* keys, int64_t pairs,
                               float scale, float* s) {
  v16f acc[8 * NRG];  // flat (acc[k * NRG + r]): GCC keeps it in registers around the loop, not on the stack
#pragma GCC unroll 24
  for (int i = 0; i < 8 * NRG; i++) acc[i] = vset1(0.0f);
  const bf16* kr[8];
#pragma GCC unroll 8
  for (int k = 0; k < 8; k++) kr[k] = keys[k];
  for (int64_t p = 0; p < pairs; p++) {
    v16u b[NRG];
#pragma GCC unroll 3
    for (int r = 0; r < NRG; r++) b[r] = vloadu(qp + (p * rg_count + r) * 16);
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) {
      const uint32_t x = load_pair(kr[k] + 2 * p);
#pragma GCC unroll 3
      for (int r = 0; r < NRG; r++) acc[k * NRG + r] = dot2(acc[k * NRG + r], x, b[r]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < 8; k++)
#pragma GCC unroll 3
    for (int r = 0; r < NRG; r++) vstore(s + (r * KT + k) * 16, acc[k * NRG + r] * scale);
}

// o[rg][d] = o[rg][d] * alpha[rg] + sum over key pairs of P V, for 8 dims from d0 and NRG groups
// (pp: [rg][KT / 2][16], o: [rg][hd][16], both from the first group).
template <int NRG>
static inline void pv_block(const uint32_t* pp, const uint32_t* vp, int64_t hd, int64_t d0, const float* alpha,
                            float* o) {
  v16f acc[8][NRG];
  for (int r = 0; r < NRG; r++) {
    const v16f a = vload(alpha + r * 16);
    for (int i = 0; i < 8; i++) acc[i][r] = vload(o + (r * hd + d0 + i) * 16) * a;
  }
  for (int64_t kp = 0; kp < KT / 2; kp++) {
    v16u b[NRG];
    for (int r = 0; r < NRG; r++) b[r] = vloadu(pp + (r * (KT / 2) + kp) * 16);
    for (int i = 0; i < 8; i++) {
      const uint32_t x = vp[kp * hd + d0 + i];
      for (int r = 0; r < NRG; r++) acc[i][r] = dot2(acc[i][r], x, b[r]);
    }
  }
  for (int r = 0; r < NRG; r++)
    for (int i = 0; i < 8; i++) vstore(o + (r * hd + d0 + i) * 16, acc[i][r]);
}

// The tile's scores for NRG row groups from rg0 (s_tile: [rg_count][KT][16]).
template <int NRG>
static inline void score_groups(const uint32_t* qp, int64_t rg_count, int64_t rg0, const bf16* const* keys,
                                int64_t pairs, float scale, float* s_tile) {
  for (int64_t k0 = 0; k0 < KT; k0 += 8)
    score_block<NRG>(qp + rg0 * 16, rg_count, keys + k0, pairs, scale, s_tile + (rg0 * KT + k0) * 16);
}

struct AttnItem {
  int64_t seq, kv_head, first, last;  // tokens first..last-1 of the sequence's new tokens
  int64_t cost;
};

#define NOINLINE __attribute__((noinline))

// Scores of the tile's keys for every row group.
static NOINLINE void score_tile(const uint32_t* qp, int64_t rgs, const bf16* const* keys, int64_t pairs, float scale,
                                float* s) {
  for (int64_t rg = 0; rg < rgs;) {
    const int64_t n = rgs - rg;
    if (n >= 3) score_groups<3>(qp, rgs, rg, keys, pairs, scale, s), rg += 3;
    else if (n == 2) score_groups<2>(qp, rgs, rg, keys, pairs, scale, s), rg += 2;
    else score_groups<1>(qp, rgs, rg, keys, pairs, scale, s), rg += 1;
  }
}

// Mask the tile's scores, update m and l, and write P as bf16 key pairs (pp) and alpha (the
// factor of the rows' previous O), for NRG row groups from rg0. Scores are in base 2 (scaled by
// scale * log2(e)), so P = 2^(s - m). `masked`: some key of the tile lies after some row's
// position (else no key is masked, and the comparisons are skipped: the same results). Each
// group's max and sum go key by key in order; the groups' chains are stepped side by side (the
// same operations per lane as one group at a time: they are bound by latency otherwise).
template <int NRG>
static inline void softmax_groups(float* s, int64_t rg0, const int32_t* qpos, int64_t t0, bool masked, float* m,
                                  float* l, float* alpha, uint32_t* pp) {
  v16f tile_max[NRG], m_new[NRG], m_sub[NRG], a[NRG], sum[NRG];
  float* sg[NRG];
  for (int r = 0; r < NRG; r++) tile_max[r] = vset1(-INFINITY), sg[r] = s + (rg0 + r) * KT * 16;
  if (masked) {
    v16i pos[NRG];
    for (int r = 0; r < NRG; r++) memcpy(&pos[r], qpos + (rg0 + r) * 16, 64);
    for (int64_t j = 0; j < KT; j++) {
      for (int r = 0; r < NRG; r++) {
        float* sp = sg[r] + j * 16;
        const v16f x = (v16i{} + (int32_t)(t0 + j)) > pos[r] ? vset1(-INFINITY) : vload(sp);
        vstore(sp, x);
        tile_max[r] = vmax(tile_max[r], x);
      }
    }
  } else {
    for (int64_t j = 0; j < KT; j++)
      for (int r = 0; r < NRG; r++) tile_max[r] = vmax(tile_max[r], vload(sg[r] + j * 16));
  }
  for (int r = 0; r < NRG; r++) {
    const v16f m_old = vload(m + (rg0 + r) * 16);
    m_new[r] = vmax(m_old, tile_max[r]);
    const v16i none = m_new[r] == vset1(-INFINITY);  // no key seen yet: P = 2^(-inf - 0) = 0, alpha 1
    m_sub[r] = none ? vset1(0.0f) : m_new[r];
    a[r] = none ? vset1(1.0f) : vexp2(m_old - m_new[r]);
  }
  for (int64_t j0 = 0; j0 < KT; j0 += EXP_KEYS) {  // P = 2^(s - m), EXP_KEYS keys at once; the sum key by key
    for (int r = 0; r < NRG; r++) {
      v16f x[EXP_KEYS];
      for (int i = 0; i < EXP_KEYS; i++) x[i] = vload(sg[r] + (j0 + i) * 16) - m_sub[r];
      vexp2_n<EXP_KEYS>(x);
      for (int i = 0; i < EXP_KEYS; i += 2) {
        const v16u pair = pair_bf16(x[i], x[i + 1]);
        memcpy(pp + ((rg0 + r) * (KT / 2) + (j0 + i) / 2) * 16, &pair, 64);
      }
      int i = 0;
      if (j0 == 0) sum[r] = x[0] + x[1], i = 2;
      for (; i < EXP_KEYS; i++) sum[r] = sum[r] + x[i];
    }
  }
  for (int r = 0; r < NRG; r++) {
    const int64_t o = (rg0 + r) * 16;
    vstore(l + o, vload(l + o) * a[r] + sum[r]);
    vstore(m + o, m_new[r]);
    vstore(alpha + o, a[r]);
  }
}

static NOINLINE void softmax_tile(float* s, int64_t rgs, const int32_t* qpos, int64_t t0, bool masked, float* m,
                                  float* l, float* alpha, uint32_t* pp) {
  for (int64_t rg = 0; rg < rgs;) {
    const int64_t n = rgs - rg;
    if (n >= 3) softmax_groups<3>(s, rg, qpos, t0, masked, m, l, alpha, pp), rg += 3;
    else if (n == 2) softmax_groups<2>(s, rg, qpos, t0, masked, m, l, alpha, pp), rg += 2;
    else softmax_groups<1>(s, rg, qpos, t0, masked, m, l, alpha, pp), rg += 1;
  }
}

// 16 pairs of 16-bit words (lo: a, hi: b).
static inline v16u pair_words(v16h a, v16h b) {
  return __builtin_convertvector(a, v16u) | (__builtin_convertvector(b, v16u) << 16);
}

// vp[kp][d] = (V[2kp][d], V[2kp + 1][d]) as one bf16 pair.
static NOINLINE void pack_values(const bf16* const* vals, int64_t hd, uint32_t* vp) {
  for (int64_t kp = 0; kp < KT / 2; kp++) {
    const bf16 *v0 = vals[2 * kp], *v1 = vals[2 * kp + 1];
    uint32_t* dst = vp + kp * hd;
    int64_t d = 0;
    for (; d + 16 <= hd; d += 16) {
      v16h lo, hi;
      memcpy(&lo, v0 + d, 32);
      memcpy(&hi, v1 + d, 32);
      const v16u pair = __builtin_convertvector(lo, v16u) | (__builtin_convertvector(hi, v16u) << 16);
      memcpy(dst + d, &pair, 64);
    }
    for (; d < hd; d++) dst[d] = (uint32_t)v0[d] | ((uint32_t)v1[d] << 16);
  }
}

static NOINLINE void pv_tile(const uint32_t* pp, const uint32_t* vp, int64_t hd, int64_t rgs, const float* alpha,
                             float* o) {
  for (int64_t d0 = 0; d0 < hd; d0 += 8) {
    for (int64_t rg = 0; rg < rgs;) {
      const int64_t n = rgs - rg;
      const uint32_t* p = pp + rg * (KT / 2) * 16;
      float* og = o + rg * hd * 16;
      if (n >= 3) pv_block<3>(p, vp, hd, d0, alpha + rg * 16, og), rg += 3;
      else if (n == 2) pv_block<2>(p, vp, hd, d0, alpha + rg * 16, og), rg += 2;
      else pv_block<1>(p, vp, hd, d0, alpha + rg * 16, og), rg += 1;
    }
  }
}

// ---- items of few rows (decode steps) -----------------------------------------------------------
// A decode token gives `group` rows per KV head (3 with SmolLM2's 9 query and 3 KV heads): along
// the lanes above, 13 of 16 lanes would compute padding. An item of at most FEW_ROWS rows puts the
// tile's keys along the lanes for the scores (its K rows transposed) and the head dims along the
// lanes for P V. Every (row, key) score and every (row, dim) output is still the same sequence of
// operations as in the row-lane path (dot2 over the pairs in order, the same softmax arithmetic
// with the tile's sum taken key by key in order, P V over the key pairs in order; a bf16 product
// is exact, so which operand is broadcast does not matter): the same bits, so a token's attention
// does not depend on whether it was decoded or prefilled.

constexpr int64_t FEW_ROWS = 8;  // score_tile_few's cases

// The 16 x 16 words of r transposed (r[i][l] -> r[l][i]): four butterflies, each swapping one bit
// of the row index with the same bit of the lane index.
template <int B>
static inline void butterfly(v16u* r, v16u lo, v16u hi) {
  for (int i = 0; i < 16; i++) {
    if (i & B) continue;
    const v16u a = r[i], c = r[i + B];
    r[i] = __builtin_shuffle(a, c, lo);
    r[i + B] = __builtin_shuffle(a, c, hi);
  }
}

static inline void transpose16(v16u* r) {
  butterfly<8>(r, v16u{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
               v16u{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  butterfly<4>(r, v16u{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
               v16u{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  butterfly<2>(r, v16u{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
               v16u{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  butterfly<1>(r, v16u{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
               v16u{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

// s[r][j] = scale * (q_r . key_j) for the tile's KT keys and NR rows: 16 keys at a time, their
// pairs transposed 16 at a time so that the keys lie along the lanes.
template <int NR>
static inline void score_rows(const bf16* const* qrows, const bf16* const* keys, int64_t pairs, float scale,
                              float* s) {
  for (int64_t g = 0; g < KT / 16; g++) {
    v16f acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = vset1(0.0f);
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const int64_t n = pairs - p0 < 16 ? pairs - p0 : 16;
      v16u kt[16];
      if (n == 16) {
        for (int k = 0; k < 16; k++) kt[k] = vloadu(keys[g * 16 + k] + 2 * p0);
      } else {
        for (int k = 0; k < 16; k++) {
          kt[k] = v16u{};
          for (int64_t i = 0; i < n; i++) kt[k][i] = load_pair(keys[g * 16 + k] + 2 * (p0 + i));
        }
      }
      transpose16(kt);  // kt[i]: pair p0 + i of the 16 keys
      for (int64_t i = 0; i < n; i++)
        for (int r = 0; r < NR; r++) acc[r] = dot2(acc[r], load_pair(qrows[r] + 2 * (p0 + i)), kt[i]);
    }
    for (int r = 0; r < NR; r++) vstore(s + r * KT + g * 16, acc[r] * scale);
  }
}

static NOINLINE void score_tile_few(const bf16* const* qrows, int64_t rows, const bf16* const* keys, int64_t pairs,
                                    float scale, float* s) {
  switch (rows) {
    case 1: score_rows<1>(qrows, keys, pairs, scale, s); break;
    case 2: score_rows<2>(qrows, keys, pairs, scale, s); break;
    case 3: score_rows<3>(qrows, keys, pairs, scale, s); break;
    case 4: score_rows<4>(qrows, keys, pairs, scale, s); break;
    case 5: score_rows<5>(qrows, keys, pairs, scale, s); break;
    case 6: score_rows<6>(qrows, keys, pairs, scale, s); break;
    case 7: score_rows<7>(qrows, keys, pairs, scale, s); break;
    default: score_rows<8>(qrows, keys, pairs, scale, s); break;
  }
}

// softmax_tile's arithmetic with the keys along the lanes; P as bf16 key pairs pp[r][KT / 2]. The
// tile's max and sum go key by key in order (the sums of the rows side by side).
static NOINLINE void softmax_tile_few(float* s, int64_t rows, const int32_t* qpos, int64_t t0, float* m, float* l,
                                      float* alpha, uint32_t* pp) {
  float p[FEW_ROWS][KT];
  for (int64_t r = 0; r < rows; r++) {
    float* sr = s + r * KT;
    if (t0 + KT - 1 > qpos[r])
      for (int64_t j = 0; j < KT; j++)
        if (t0 + j > qpos[r]) sr[j] = -INFINITY;
    float tile_max = -INFINITY;
    for (int64_t j = 0; j < KT; j++) tile_max = tile_max > sr[j] ? tile_max : sr[j];
    const float m_old = m[r], m_new = m_old > tile_max ? m_old : tile_max;
    const bool none = m_new == -INFINITY;
    const float m_sub = none ? 0.0f : m_new;
    alpha[r] = none ? 1.0f : vexp2(vset1(m_old - m_new))[0];
    m[r] = m_new;
    for (int64_t g = 0; g < KT / 16; g++) {
      const v16f x = vexp2(vload(sr + g * 16) - m_sub);
      vstore(p[r] + g * 16, x);
      const v16h h = to_bf16(x);
      memcpy(pp + r * (KT / 2) + g * 8, &h, 32);
    }
  }
  float sum[FEW_ROWS];
  for (int64_t r = 0; r < rows; r++) sum[r] = p[r][0] + p[r][1];
  for (int64_t j = 2; j < KT; j++)
    for (int64_t r = 0; r < rows; r++) sum[r] = sum[r] + p[r][j];
  for (int64_t r = 0; r < rows; r++) l[r] = l[r] * alpha[r] + sum[r];
}

// o[r][d] = o[r][d] * alpha[r] + sum over key pairs of P V, dims along the lanes, 64 dims at a
// time (o rows and vp padded to whole 64s).
static NOINLINE void pv_tile_few(const uint32_t* pp, const uint32_t* vp, int64_t hd, int64_t ldo, int64_t rows,
                                 const float* alpha, float* o) {
  for (int64_t r = 0; r < rows; r++) {
    const v16f a = vset1(alpha[r]);
    float* orow = o + r * ldo;
    for (int64_t d0 = 0; d0 < hd; d0 += 64) {
      v16f acc[4];
      for (int i = 0; i < 4; i++) acc[i] = vload(orow + d0 + 16 * i) * a;
      for (int64_t kp = 0; kp < KT / 2; kp++) {
        const uint32_t x = pp[r * (KT / 2) + kp];
        for (int i = 0; i < 4; i++) acc[i] = dot2(acc[i], x, vloadu(vp + kp * hd + d0 + 16 * i));
      }
      for (int i = 0; i < 4; i++) vstore(orow + d0 + 16 * i, acc[i]);
    }
  }
}

// A few-row work item's query rows (sc.src: its tokens first..first + rows / group, each token's
// group of heads on kv_head) and their absolute positions (sc.qpos); its scratch sized and its
// softmax state (sc.state: m, l, alpha) started.
static inline void item_queries(const bf16* q, int64_t num_heads, int64_t group, int64_t hd, int64_t kv_head,
                                int64_t ctx, int64_t row0, int64_t first, int64_t rows, AttnScratch& sc) {
  if ((int64_t)sc.zeros.size() < hd) sc.zeros.assign(hd, 0);
  sc.src.resize(rows);
  sc.qpos.resize(rows);
  for (int64_t r = 0; r < rows; r++) {
    const int64_t tok = first + r / group, head = kv_head * group + r % group;
    sc.src[r] = q + ((row0 + tok) * num_heads + head) * hd;
    sc.qpos[r] = (int32_t)(ctx + tok);
  }
  sc.s.resize(rows * KT);
  sc.pp.resize(rows * KT / 2);
  sc.state.resize(3 * rows);
  for (int64_t i = 0; i < rows; i++) sc.state[i] = -INFINITY, sc.state[rows + i] = 0.0f;
}

// The K and V rows of tile t0 (keys t0 .. t0 + KT - 1 of one KV head, at koff in a token's row);
// keys at or past kv_end read zeros.
static inline void tile_rows(const CacheLayout& cache, const int32_t* table, int64_t koff, int64_t t0,
                             int64_t kv_end, const bf16* zeros, const bf16** keys, const bf16** vals) {
  int64_t block = t0 / cache.block_size, offset = t0 % cache.block_size;
  for (int64_t j = 0; j < KT; j++) {
    if (t0 + j < kv_end) {
      const bf16* row = cache.base + table[block] * cache.block_stride + offset * cache.token_stride + koff;
      keys[j] = row, vals[j] = row + cache.v_offset;
    } else {
      keys[j] = vals[j] = zeros;
    }
    if (++offset == cache.block_size) offset = 0, block++;
  }
}

static void attend_item_few(const bf16* q, bf16* out, int64_t num_heads, int64_t group, int64_t hd,
                            const CacheLayout& cache, const int32_t* table, int64_t kv_head, int64_t ctx, int64_t row0,
                            int64_t first, int64_t last, float scale, AttnScratch& sc) {
  const int64_t rows = (last - first) * group, pairs = hd / 2, ldo = (hd + 63) / 64 * 64;
  item_queries(q, num_heads, group, hd, kv_head, ctx, row0, first, rows, sc);
  const bf16* const* qrows = sc.src.data();
  const int32_t* qpos = sc.qpos.data();
  sc.vp.assign(KT / 2 * hd + 64, 0);  // padded: P V reads whole 64s of dims
  sc.o.assign(rows * ldo, 0.0f);
  float *m = sc.state.data(), *l = m + rows, *alpha = l + rows;
  const int64_t kv_end = ctx + last, koff = kv_head * hd;
  const float scale2 = scale * 1.44269504088896341f;
  for (int64_t t0 = 0; t0 < kv_end; t0 += KT) {
    const bf16* keys[KT];
    const bf16* vals[KT];
    tile_rows(cache, table, koff, t0, kv_end, sc.zeros.data(), keys, vals);
    score_tile_few(qrows, rows, keys, pairs, scale2, sc.s.data());
    softmax_tile_few(sc.s.data(), rows, qpos, t0, m, l, alpha, sc.pp.data());
    pack_values(vals, hd, sc.vp.data());
    pv_tile_few(sc.pp.data(), sc.vp.data(), hd, ldo, rows, alpha, sc.o.data());
  }
  for (int64_t r = 0; r < rows; r++) {
    const int64_t tok = first + r / group, head = kv_head * group + r % group;
    bf16* dst = out + ((row0 + tok) * num_heads + head) * hd;
    const v16f inv = vset1(l[r]);
    for (int64_t d = 0; d < hd; d += 16) store_bf16_n(dst + d, vload(sc.o.data() + r * ldo + d) / inv,
                                                     hd - d < 16 ? hd - d : 16);
  }
}

// ---- the fast case of few rows: head_dim 64 or 128 ---------------------------------------------
// The same arithmetic as above, with the work laid out for a decode step's 3-8 rows: the tile's
// K pairs transposed once into keys-along-lanes (in-lane unpacks and 128-bit shuffles, cheaper
// than the butterflies' two-source permutes) and shared by the item's rows; the softmax per row
// on whole vectors (the max is the same whatever the order; the sum still goes key by key in
// order); P V with the V pairs made in registers (two V rows interleaved word by word within
// 128-bit lanes: each output lane still gets one dim's products over the key pairs in order, only
// the dims' order along the lanes is permuted, and put back when O is written out). The K/V of
// the tile after next are prefetched while this one is computed: the rows of one KV head are 1 in
// 3 of the cache's lines (heads interleave per token), which the hardware prefetchers do not
// follow, so without it a decode step waits on DRAM latency tile after tile.

typedef uint16_t v32h __attribute__((vector_size(64)));

// 16 x 16 words transposed (r[i][l] -> r[l][i]) with unpacks within 128-bit lanes, then 128-bit
// lane shuffles: the butterflies' result, in cheaper instructions.
static inline void transpose16_unpack(v16u* r) {
  v16u t[16], u[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], v16u{0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29});
    t[2 * i + 1] =
        __builtin_shuffle(r[2 * i], r[2 * i + 1], v16u{2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31});
  }
  // u[4i + j]: in 128-bit lane k, element 4k + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; i++) {
    const v16u lo64 = v16u{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const v16u hi64 = v16u{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    u[4 * i + 0] = __builtin_shuffle(t[4 * i], t[4 * i + 2], lo64);
    u[4 * i + 1] = __builtin_shuffle(t[4 * i], t[4 * i + 2], hi64);
    u[4 * i + 2] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], lo64);
    u[4 * i + 3] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], hi64);
  }
  const v16u even = v16u{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};  // lanes 0, 2 of each
  const v16u odd = v16u{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};  // lanes 1, 3
  for (int j = 0; j < 4; j++) {
    const v16u x0 = __builtin_shuffle(u[j], u[4 + j], even), x1 = __builtin_shuffle(u[j], u[4 + j], odd);
    const v16u y0 = __builtin_shuffle(u[8 + j], u[12 + j], even), y1 = __builtin_shuffle(u[8 + j], u[12 + j], odd);
    r[j] = __builtin_shuffle(x0, y0, even);        // element j
    r[4 + j] = __builtin_shuffle(x1, y1, even);    // element 4 + j
    r[8 + j] = __builtin_shuffle(x0, y0, odd);     // element 8 + j
    r[12 + j] = __builtin_shuffle(x1, y1, odd);    // element 12 + j
  }
}

// kt[p][j]: pair p of the tile's key j (pairs: a multiple of 16).
static NOINLINE void transpose_keys(const bf16* const* keys, int64_t pairs, uint32_t* kt) {
  for (int64_t g = 0; g < KT / 16; g++) {
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      v16u r[16];
      for (int k = 0; k < 16; k++) r[k] = vloadu(keys[g * 16 + k] + 2 * p0);
      transpose16_unpack(r);
      for (int i = 0; i < 16; i++) memcpy(kt + (p0 + i) * KT + g * 16, &r[i], 64);
    }
  }
}

// s[r][j] = scale * (q_r . key_j) for NR rows (score_rows' arithmetic), from the transposed tile.
template <int NR>
static inline void score_rows_kt(const bf16* const* qrows, const uint32_t* kt, int64_t pairs, float scale, float* s) {
  static_assert(KT == 32, "two vectors of keys");
  v16f acc[NR][2];
  for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = vset1(0.0f);
  for (int64_t p = 0; p < pairs; p++) {
    const v16u k0 = vloadu(kt + p * KT), k1 = vloadu(kt + p * KT + 16);
    for (int r = 0; r < NR; r++) {
      const uint32_t x = load_pair(qrows[r] + 2 * p);
      acc[r][0] = dot2(acc[r][0], x, k0);
      acc[r][1] = dot2(acc[r][1], x, k1);
    }
  }
  for (int r = 0; r < NR; r++) {
    vstore(s + r * KT, acc[r][0] * scale);
    vstore(s + r * KT + 16, acc[r][1] * scale);
  }
}

static NOINLINE void score_tile_kt(const bf16* const* qrows, int64_t rows, const uint32_t* kt, int64_t pairs,
                                   float scale, float* s) {
  for (int64_t r = 0; r < rows; r += 4) {
    switch (rows - r < 4 ? rows - r : 4) {
      case 1: score_rows_kt<1>(qrows + r, kt, pairs, scale, s + r * KT); break;
      case 2: score_rows_kt<2>(qrows + r, kt, pairs, scale, s + r * KT); break;
      case 3: score_rows_kt<3>(qrows + r, kt, pairs, scale, s + r * KT); break;
      default: score_rows_kt<4>(qrows + r, kt, pairs, scale, s + r * KT); break;
    }
  }
}

static inline float hmax(v16f x) {  // the largest lane (the same whatever the order: no NaN here)
  float m = x[0];
  for (int i = 1; i < 16; i++) m = m > x[i] ? m : x[i];
  return m;
}

// softmax_tile_few's arithmetic on whole vectors of keys (the sum key by key in order).
static NOINLINE void softmax_tile_vec(float* s, int64_t rows, const int32_t* qpos, int64_t t0, float* m, float* l,
                                      float* alpha, uint32_t* pp) {
  float p[FEW_ROWS][KT];
  const v16i iota = v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t r = 0; r < rows; r++) {
    float* sr = s + r * KT;
    v16f x[2] = {vload(sr), vload(sr + 16)};
    if (t0 + KT - 1 > qpos[r]) {
      const v16i pos = v16i{} + qpos[r];
      for (int g = 0; g < 2; g++) x[g] = (iota + (int32_t)(t0 + 16 * g)) > pos ? vset1(-INFINITY) : x[g];
    }
    const float tile_max = hmax(vmax(x[0], x[1]));
    const float m_old = m[r], m_new = m_old > tile_max ? m_old : tile_max;
    const bool none = m_new == -INFINITY;
    const float m_sub = none ? 0.0f : m_new;
    alpha[r] = none ? 1.0f : vexp2(vset1(m_old - m_new))[0];
    m[r] = m_new;
    x[0] = x[0] - m_sub, x[1] = x[1] - m_sub;
    vexp2_n<2>(x);
    vstore(p[r], x[0]);
    vstore(p[r] + 16, x[1]);
    const v16h h0 = to_bf16(x[0]), h1 = to_bf16(x[1]);
    memcpy(pp + r * (KT / 2), &h0, 32);
    memcpy(pp + r * (KT / 2) + 8, &h1, 32);
  }
  float sum[FEW_ROWS];
  for (int64_t r = 0; r < rows; r++) sum[r] = p[r][0] + p[r][1];
  for (int64_t j = 2; j < KT; j++)
    for (int64_t r = 0; r < rows; r++) sum[r] = sum[r] + p[r][j];
  for (int64_t r = 0; r < rows; r++) l[r] = l[r] * alpha[r] + sum[r];
}

// o[r][:] = o[r][:] * alpha[r] + P V for NR rows and NV vectors of dims (o in the permuted dim
// order: per 32 dims, the pairs of V rows' words interleaved within 128-bit lanes, lo then hi).
template <int NR, int NV>
static inline void pv_rows_vec(const uint32_t* pp, const bf16* const* vals, const float* alpha, float* o) {
  v16f acc[NR][NV];
  for (int r = 0; r < NR; r++) {
    const v16f a = vset1(alpha[r]);
    for (int i = 0; i < NV; i++) acc[r][i] = vload(o + (r * NV + i) * 16) * a;
  }
  const v32h lo = v32h{0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43,
                       16, 48, 17, 49, 18, 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59};
  const v32h hi = lo + 4;
  for (int64_t kp = 0; kp < KT / 2; kp++) {
    const bf16 *v0 = vals[2 * kp], *v1 = vals[2 * kp + 1];
    for (int c = 0; c < NV / 2; c++) {
      v32h a, b;
      memcpy(&a, v0 + 32 * c, 64);
      memcpy(&b, v1 + 32 * c, 64);
      const v16u vlo = (v16u)__builtin_shuffle(a, b, lo), vhi = (v16u)__builtin_shuffle(a, b, hi);
      for (int r = 0; r < NR; r++) {
        const uint32_t x = pp[r * (KT / 2) + kp];
        acc[r][2 * c] = dot2(acc[r][2 * c], x, vlo);
        acc[r][2 * c + 1] = dot2(acc[r][2 * c + 1], x, vhi);
      }
    }
  }
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < NV; i++) vstore(o + (r * NV + i) * 16, acc[r][i]);
}

template <int NV>
static NOINLINE void pv_tile_vec(const uint32_t* pp, const bf16* const* vals, int64_t rows, const float* alpha,
                                 float* o) {
  constexpr int MAXR = 16 / NV;  // accumulators in registers
  for (int64_t r = 0; r < rows; r += MAXR) {
    const int64_t n = rows - r < MAXR ? rows - r : MAXR;
    const uint32_t* p = pp + r * (KT / 2);
    float* og = o + r * NV * 16;
    if (n == 1) pv_rows_vec<1, NV>(p, vals, alpha + r, og);
    else if (n == 2) pv_rows_vec<2, NV>(p, vals, alpha + r, og);
    else if (MAXR >= 3 && n == 3) pv_rows_vec<(MAXR >= 3 ? 3 : 1), NV>(p, vals, alpha + r, og);
    else pv_rows_vec<(MAXR >= 4 ? 4 : 1), NV>(p, vals, alpha + r, og);
  }
}

// Into L2 (prefetcht1): measured against L1 (t0) and L3 (t2), 1, 2, 4 and 8 tiles ahead, t1 two
// tiles ahead was the fastest from DRAM (batch-4 decode at 600 context: 2.2x less time than none).
static inline void prefetch_rows(const bf16* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)row + b, 0, 2);
}

static void attend_item_vec(const bf16* q, bf16* out, int64_t num_heads, int64_t group, int64_t hd,
                            const CacheLayout& cache, const int32_t* table, int64_t kv_head, int64_t ctx, int64_t row0,
                            int64_t first, int64_t last, float scale, AttnScratch& sc) {
  const int64_t rows = (last - first) * group, pairs = hd / 2, nv = hd / 16;
  item_queries(q, num_heads, group, hd, kv_head, ctx, row0, first, rows, sc);
  const bf16* const* qrows = sc.src.data();
  const int32_t* qpos = sc.qpos.data();
  sc.qp.resize(pairs * KT);  // the tile's K, transposed
  sc.o.assign(rows * hd, 0.0f);
  float *m = sc.state.data(), *l = m + rows, *alpha = l + rows;
  const int64_t kv_end = ctx + last, koff = kv_head * hd;
  const float scale2 = scale * 1.44269504088896341f;
  // The prefetch cursor runs AHEAD tiles before the tile being computed.
  constexpr int64_t AHEAD = 2;  // tiles
  int64_t pf = 0, pf_block = 0, pf_offset = 0;
  auto prefetch_to = [&](int64_t end) {
    for (end = end < kv_end ? end : kv_end; pf < end; pf++) {
      const bf16* row = cache.base + table[pf_block] * cache.block_stride + pf_offset * cache.token_stride + koff;
      prefetch_rows(row, 2 * hd), prefetch_rows(row + cache.v_offset, 2 * hd);
      if (++pf_offset == cache.block_size) pf_offset = 0, pf_block++;
    }
  };
  prefetch_to(AHEAD * KT);
  for (int64_t t0 = 0; t0 < kv_end; t0 += KT) {
    const bf16* keys[KT];
    const bf16* vals[KT];
    tile_rows(cache, table, koff, t0, kv_end, sc.zeros.data(), keys, vals);
    prefetch_to(t0 + (AHEAD + 1) * KT);
    transpose_keys(keys, pairs, sc.qp.data());
    score_tile_kt(qrows, rows, sc.qp.data(), pairs, scale2, sc.s.data());
    softmax_tile_vec(sc.s.data(), rows, qpos, t0, m, l, alpha, sc.pp.data());
    if (nv == 4) pv_tile_vec<4>(sc.pp.data(), vals, rows, alpha, sc.o.data());
    else pv_tile_vec<8>(sc.pp.data(), vals, rows, alpha, sc.o.data());
  }
  // O's dims back in order: per 32 dims, dim 8k + i (i < 4) in lane 4k + i of the lo vector, dim
  // 8k + 4 + i in lane 4k + i of the hi vector.
  const v16u back0 = v16u{0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  const v16u back1 = back0 + 8;
  for (int64_t r = 0; r < rows; r++) {
    const int64_t tok = first + r / group, head = kv_head * group + r % group;
    bf16* dst = out + ((row0 + tok) * num_heads + head) * hd;
    const v16f inv = vset1(l[r]);
    const float* orow = sc.o.data() + r * hd;
    for (int64_t c = 0; c < hd / 32; c++) {
      const v16f a = vload(orow + 32 * c), b = vload(orow + 32 * c + 16);
      store_bf16(dst + 32 * c, __builtin_shuffle(a, b, back0) / inv);
      store_bf16(dst + 32 * c + 16, __builtin_shuffle(a, b, back1) / inv);
    }
  }
}

static void attend_item(const bf16* q, bf16* out, int64_t num_heads, int64_t group, int64_t hd, const CacheLayout& cache,
                        const int32_t* table, int64_t kv_head, int64_t ctx, int64_t row0, int64_t first, int64_t last,
                        float scale, AttnScratch& sc) {
  const int64_t rows = (last - first) * group, rgs = (rows + 15) / 16, pairs = hd / 2, width = rgs * 16;
  if ((int64_t)sc.zeros.size() < hd) sc.zeros.assign(hd, 0);
  sc.src.resize(width);  // rows <= max(ITEM_ROWS, group) (see attention())
  const bf16** src = sc.src.data();
  sc.qpos.assign(width, -1);  // padding lanes: every key masked
  for (int64_t r = 0; r < width; r++) {
    const int64_t tok = first + r / group, head = kv_head * group + r % group;
    src[r] = r < rows ? q + ((row0 + tok) * num_heads + head) * hd : sc.zeros.data();
    if (r < rows) sc.qpos[r] = (int32_t)(ctx + tok);
  }
  // qp[p][r]: pair p of row r, 16 rows by 16 pairs at a time through a transpose.
  sc.qp.resize(pairs * width);
  for (int64_t r0 = 0; r0 < width; r0 += 16) {
    int64_t p0 = 0;
    for (; p0 + 16 <= pairs; p0 += 16) {
      v16u t[16];
      for (int i = 0; i < 16; i++) t[i] = vloadu(src[r0 + i] + 2 * p0);
      transpose16(t);  // t[i]: pair p0 + i of the 16 rows
      for (int i = 0; i < 16; i++) memcpy(sc.qp.data() + (p0 + i) * width + r0, &t[i], 64);
    }
    for (int64_t p = p0; p < pairs; p++)
      for (int64_t r = r0; r < r0 + 16; r++) sc.qp[p * width + r] = load_pair(src[r] + 2 * p);
  }
  sc.s.resize(KT * width);
  sc.pp.resize(KT / 2 * width);
  sc.vp.resize(KT / 2 * hd);
  sc.o.assign(width * hd, 0.0f);
  sc.state.resize(3 * width);  // m, l, alpha
  float *m = sc.state.data(), *l = m + width, *alpha = l + width;
  for (int64_t i = 0; i < width; i++) m[i] = -INFINITY, l[i] = 0.0f;
  const int64_t kv_end = ctx + last, first_pos = ctx + first, koff = kv_head * hd;
  const float scale2 = scale * 1.44269504088896341f;  // softmax in base 2: 2^(s log2 e) = e^s
  for (int64_t t0 = 0; t0 < kv_end; t0 += KT) {
    const bf16* keys[KT];
    const bf16* vals[KT];
    tile_rows(cache, table, koff, t0, kv_end, sc.zeros.data(), keys, vals);  // past kv_end: masked, V exactly 0
    score_tile(sc.qp.data(), rgs, keys, pairs, scale2, sc.s.data());
    softmax_tile(sc.s.data(), rgs, sc.qpos.data(), t0, t0 + KT - 1 > first_pos || rows % 16, m, l, alpha,
                 sc.pp.data());
    pack_values(vals, hd, sc.vp.data());
    pv_tile(sc.pp.data(), sc.vp.data(), hd, rgs, alpha, sc.o.data());
  }
  // out = bf16(O / l): per group of 16 rows, dims paired and transposed 32 dims at a time.
  sc.dst.resize(rows);
  bf16** dst = sc.dst.data();
  for (int64_t r = 0; r < rows; r++) {
    const int64_t tok = first + r / group, head = kv_head * group + r % group;
    dst[r] = out + ((row0 + tok) * num_heads + head) * hd;
  }
  for (int64_t rg = 0; rg < rgs; rg++) {
    const float* og = sc.o.data() + rg * hd * 16;
    const v16f lg = vload(l + rg * 16);
    const int64_t n = rows - rg * 16 < 16 ? rows - rg * 16 : 16;
    int64_t d0 = 0;
    for (; d0 + 32 <= hd; d0 += 32) {
      v16u t[16];
      for (int i = 0; i < 16; i++) t[i] = pair_words(to_bf16(vload(og + (d0 + 2 * i) * 16) / lg),
                                                    to_bf16(vload(og + (d0 + 2 * i + 1) * 16) / lg));
      transpose16(t);  // t[i]: row i's 16 dim pairs
      for (int64_t i = 0; i < n; i++) memcpy(dst[rg * 16 + i] + d0, &t[i], 64);
    }
    for (int64_t d = d0; d < hd; d++) {
      const v16h h = to_bf16(vload(og + d * 16) / lg);
      for (int64_t i = 0; i < n; i++) dst[rg * 16 + i][d] = h[i];
    }
  }
}

// out [T, H, hd] = attention of q [T, H, hd] (rotary applied; the step's K/V already in the cache).
static void attention(const bf16* q, bf16* out, int64_t num_heads, int64_t num_kv_heads, int64_t hd,
                      CacheLayout cache, const int32_t* query_start, const int32_t* seq_lens,
                      const int32_t* block_tables, int64_t table_stride, int64_t num_seqs, float scale,
                      int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t tokens_per_item = group >= ITEM_ROWS ? 1 : ITEM_ROWS / group;
  std::vector<AttnItem> items;
  for (int64_t s = 0; s < num_seqs; s++) {
    const int64_t len = query_start[s + 1] - query_start[s], ctx = seq_lens[s] - len;
    for (int64_t first = 0; first < len; first += tokens_per_item) {
      const int64_t last = first + tokens_per_item < len ? first + tokens_per_item : len;
      for (int64_t h = 0; h < num_kv_heads; h++) items.push_back({s, h, first, last, (last - first) * (ctx + last)});
    }
  }
  // Longest first, for the balance only: an item's result does not depend on where it runs.
  std::stable_sort(items.begin(), items.end(), [](const AttnItem& a, const AttnItem& b) { return a.cost > b.cost; });
#pragma omp parallel num_threads(num_threads)
  {
    AttnScratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)items.size(); i++) {
      const AttnItem& it = items[i];
      const int64_t len = query_start[it.seq + 1] - query_start[it.seq];
      const bool few = (it.last - it.first) * group <= FEW_ROWS;
      (few ? (hd == 64 || hd == 128 ? attend_item_vec : attend_item_few) : attend_item)(q, out, num_heads, group, hd, cache, block_tables + it.seq * table_stride,
                                            it.kv_head, seq_lens[it.seq] - len, query_start[it.seq], it.first,
                                            it.last, scale, sc);
    }
  }
}
