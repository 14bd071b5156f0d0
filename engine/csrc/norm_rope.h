// Row-wise kernels: RMSNorm (with the residual add before it) and rotary + KV cache write.
// One row's result depends only on that row.

// Sum of a row's squares: 16 lanes over the row in order, then a fixed tree over the lanes.
static inline float sum_squares(const bf16* x, int64_t d) {
  v16f acc = vset1(0.0f);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const v16f v = load_bf16(x + i);
    acc = acc + v * v;
  }
  if (i < d) {
    const v16f v = load_bf16_n(x + i, d - i);
    acc = acc + v * v;
  }
  float l[16];
  vstore(l, acc);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; j++) l[j] = l[j] + l[j + w];
  return l[0];
}

// out = weight * bf16(r * rsqrt(mean(r^2) + eps)), r = x (+ residual, rounded to bf16 and
// written to res_out): Hugging Face's LlamaRMSNorm on bf16.
static void rms_norm(const bf16* x, int64_t ldx, const bf16* res, int64_t ldr, bf16* res_out, int64_t ldro,
                     const bf16* weight, bf16* out, int64_t ldo, int64_t m, int64_t d, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t row = 0; row < m; row++) {
    const bf16* r = x + row * ldx;
    if (res) {
      bf16* ro = res_out + row * ldro;
      const bf16* rr = res + row * ldr;
      for (int64_t i = 0; i < d; i += 16) {
        const int64_t n = d - i < 16 ? d - i : 16;
        store_bf16_n(ro + i, load_bf16_n(r + i, n) + load_bf16_n(rr + i, n), n);
      }
      r = ro;
    }
    const float inv = 1.0f / std::sqrt(sum_squares(r, d) / (float)d + eps);
    bf16* o = out + row * ldo;
    for (int64_t i = 0; i < d; i += 16) {
      const int64_t n = d - i < 16 ? d - i : 16;
      const v16f y = round_bf16(load_bf16_n(r + i, n) * inv);
      store_bf16_n(o + i, y * load_bf16_n(weight + i, n), n);
    }
  }
}

// Rotate-half rotary on one head, in bf16 steps as Hugging Face does it on bf16 tensors:
// out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), cos and sin already bf16.
static inline void rotate_head(const bf16* x, const bf16* cos, const bf16* sin, bf16* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const int64_t n = half - i < 16 ? half - i : 16;
    const v16f x1 = load_bf16_n(x + i, n), x2 = load_bf16_n(x + half + i, n);
    const v16f c1 = load_bf16_n(cos + i, n), c2 = load_bf16_n(cos + half + i, n);
    const v16f s1 = load_bf16_n(sin + i, n), s2 = load_bf16_n(sin + half + i, n);
    store_bf16_n(out + i, round_bf16(x1 * c1) + round_bf16(-x2 * s1), n);
    store_bf16_n(out + half + i, round_bf16(x2 * c2) + round_bf16(x1 * s2), n);
  }
}

struct CacheLayout {  // one layer's paged K/V: token (block, offset) of KV head h at
  bf16* base;         // base + block * block_stride + offset * token_stride + h * head_dim (V: + v_offset)
  int64_t block_size, block_stride, v_offset, token_stride;
};

// q_out [T, H, hd] = rotary(q); the cache slot of each token gets rotary(k) and v.
static void rotary_cache_write(const bf16* q, const bf16* k, const bf16* v, int64_t ld, int64_t t, int64_t h,
                               int64_t kvh, int64_t hd, const bf16* cos, const bf16* sin, int64_t ld_rot,
                               bf16* q_out, CacheLayout cache, const int64_t* slots, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < t; i++) {
    const bf16 *c = cos + i * ld_rot, *s = sin + i * ld_rot;
    for (int64_t j = 0; j < h; j++) rotate_head(q + i * ld + j * hd, c, s, q_out + (i * h + j) * hd, hd);
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    bf16* dst = cache.base + (slot / cache.block_size) * cache.block_stride + (slot % cache.block_size) * cache.token_stride;
    for (int64_t j = 0; j < kvh; j++) {
      rotate_head(k + i * ld + j * hd, c, s, dst + j * hd, hd);
      memcpy(dst + cache.v_offset + j * hd, v + i * ld + j * hd, 2 * hd);
    }
  }
}
