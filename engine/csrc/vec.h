// 16-lane float vectors (GCC vector extensions) and the few operations the kernels need.
//
// Included once per ISA tier inside that tier's namespace (see cpu_kernels.cpp): with
// TANDEM_NATIVE_BF16 the bf16 dot products and roundings take the AVX512-BF16 instructions,
// otherwise they are emulated with fp32 arithmetic that gives the same bits for finite,
// normal inputs (a bf16 x bf16 product is exact in fp32, so each step of VDPBF16PS is one
// rounded add). Every lane computes the same sequence of operations whatever its position,
// so a result never depends on which rows share a vector.

static inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline v16f vset1(float x) { return v16f{} + x; }
static inline v16f vload(const float* p) {
  v16f r;
  memcpy(&r, p, 64);
  return r;
}
static inline void vstore(float* p, v16f v) { memcpy(p, &v, 64); }
static inline v16u vloadu(const void* p) {
  v16u r;
  memcpy(&r, p, 64);
  return r;
}
static inline uint32_t load_pair(const bf16* p) {  // two bf16 as one 32-bit word (low: p[0])
  uint32_t r;
  memcpy(&r, p, 4);
  return r;
}
static inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

// acc + a.hi * b.hi + a.lo * b.lo per lane (a: one bf16 pair for every lane, b: 16 pairs),
// the high halves first: VDPBF16PS.
static inline v16f dot2(v16f acc, uint32_t a, v16u b) {
#if TANDEM_NATIVE_BF16
  return (v16f)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)(__m512i)b);
#else
  const float a_hi = bits_to_float(a & 0xffff0000u), a_lo = bits_to_float(a << 16);
  acc = acc + a_hi * (v16f)(b & 0xffff0000u);
  return acc + a_lo * (v16f)(b << 16);
#endif
}

// 16 floats rounded to bf16 (round to nearest even), as 16-bit words.
static inline v16h to_bf16(v16f x) {
#if TANDEM_NATIVE_BF16
  __m256bh r = _mm512_cvtneps_pbh((__m512)x);
  v16h h;
  memcpy(&h, &r, 32);
  return h;
#else
  const v16u u = (v16u)x;
  v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v16i nan = (v16i)((u & 0x7fffffffu) > 0x7f800000u);
  r = nan ? ((u >> 16) | 0x40u) : r;
  return __builtin_convertvector(r, v16h);
#endif
}

static inline v16f from_bf16(v16h h) { return (v16f)(__builtin_convertvector(h, v16u) << 16); }
static inline v16f round_bf16(v16f x) { return from_bf16(to_bf16(x)); }

static inline v16f load_bf16(const bf16* p) {
  v16h h;
  memcpy(&h, p, 32);
  return from_bf16(h);
}
static inline v16f load_bf16_n(const bf16* p, int64_t n) {  // n <= 16 values, the rest 0
  if (n == 16) return load_bf16(p);
  v16h h = {};
  memcpy(&h, p, 2 * n);
  return from_bf16(h);
}
static inline void store_bf16(bf16* p, v16f x) {
  const v16h h = to_bf16(x);
  memcpy(p, &h, 32);
}
static inline void store_bf16_n(bf16* p, v16f x, int64_t n) {
  const v16h h = to_bf16(x);
  if (n == 16) memcpy(p, &h, 32);
  else memcpy(p, &h, 2 * n);
}

// exp(x): Cephes' expf (about 1 ulp) on [-86, 88]; 0 below -86 (and for -inf), exp(0) == 1.
static inline v16f vexp(v16f x) {
  const v16i under = x < vset1(-86.0f);
  x = x < vset1(-86.0f) ? vset1(-86.0f) : x;
  x = x > vset1(88.0f) ? vset1(88.0f) : x;
  const v16f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = vset1(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const v16f e = (v16f)((v16i)p + (__builtin_convertvector(n, v16i) << 23));
  return under ? vset1(0.0f) : e;
}

// 2^x: a degree-6 polynomial on the fraction (relative error about 2e-7) times 2^round(x); 0 below
// -124 (and for -inf), exp2(0) == 1. x - round(x) is exact, so no range reduction error.
static inline v16f vexp2(v16f x) {
  const v16i under = x < vset1(-124.0f);
  x = under ? vset1(-124.0f) : x;
  x = x > vset1(127.0f) ? vset1(127.0f) : x;
  const v16f n = (x + 12582912.0f) - 12582912.0f;  // round to nearest
  const v16f f = x - n;                            // in [-0.5, 0.5]
  v16f p = vset1(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const v16f e = (v16f)((v16i)p + (__builtin_convertvector(n, v16i) << 23));
  return under ? vset1(0.0f) : e;
}

// vexp2 of N vectors x <= 0 (or NaN: the softmax's s - max) in place, the same bits as vexp2: the
// same operations per lane, stepped side by side (N independent dependency chains through the
// polynomial instead of one: the softmax's exponentials are bound by its latency otherwise), less
// the clamp at 127 (a no-op here).
template <int N>
static inline void vexp2_n(v16f* x) {
  v16i under[N];
  v16i e[N];
  v16f f[N], p[N];
  for (int i = 0; i < N; i++) {
    under[i] = x[i] < vset1(-124.0f);
    x[i] = under[i] ? vset1(-124.0f) : x[i];
    const v16f n = (x[i] + 12582912.0f) - 12582912.0f;  // round to nearest
    e[i] = __builtin_convertvector(n, v16i) << 23;
    f[i] = x[i] - n;
    p[i] = vset1(1.535336188319500e-4f);
  }
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 1.339887440266574e-3f;
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 9.618437357674640e-3f;
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 5.550332471162809e-2f;
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 2.402264791363012e-1f;
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 6.931472028550421e-1f;
  for (int i = 0; i < N; i++) p[i] = p[i] * f[i] + 1.0f;
  for (int i = 0; i < N; i++) x[i] = under[i] ? vset1(0.0f) : (v16f)((v16i)p[i] + e[i]);
}

// Two rows of 16 floats as 16 bf16 pairs (lo: a, hi: b), each rounded to nearest even.
static inline v16u pair_bf16(v16f a, v16f b) {
#if TANDEM_NATIVE_BF16
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);  // a in words 0-15, b in 16-31
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return (v16u)_mm512_permutexvar_epi16(idx, both);
#else
  return __builtin_convertvector(to_bf16(a), v16u) | (__builtin_convertvector(to_bf16(b), v16u) << 16);
#endif
}

// silu(x) = x / (1 + exp(-x)), as torch computes it in float32.
static inline v16f vsilu(v16f x) { return x / (vexp(-x) + 1.0f); }
