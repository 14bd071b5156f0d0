// C = A W^T for bf16 A [M, K] (rows lda apart) and a weight packed in blocks of 32 output
// columns: block b holds W[32b + j, 2p + i] at dword (b, p, j), half i, so one 64-byte load
// gives 16 columns' pair p. Every output is one thread's dot product over all of K, in K's
// order: its bits depend on neither M (which other rows are in the batch) nor the threads.
//
// Epilogues: EPI_BF16 (C bf16, + bias), EPI_F32 (C float32, + bias), EPI_SILU_MUL (block b
// holds gate columns 16b..16b+15 then the matching up columns; C = silu(gate) * up in bf16,
// each of gate, up, silu(gate) and the product rounded to bf16 as torch does).

enum { EPI_BF16 = 0, EPI_F32 = 1, EPI_SILU_MUL = 2 };

template <int MR>
static inline void gemm_tile(const bf16* a, int64_t lda, const uint32_t* w, int64_t kp_count, const float* bias,
                             int epi, char* c, int64_t ldc, int64_t ncols) {
  v16f acc[MR][2];
  for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = vset1(0.0f);
  for (int64_t kp = 0; kp < kp_count; kp++) {
    const v16u b0 = vloadu(w + kp * 32), b1 = vloadu(w + kp * 32 + 16);
    for (int i = 0; i < MR; i++) {
      const uint32_t x = load_pair(a + i * lda + 2 * kp);
      acc[i][0] = dot2(acc[i][0], x, b0);
      acc[i][1] = dot2(acc[i][1], x, b1);
    }
  }
  for (int i = 0; i < MR; i++) {
    v16f lo = acc[i][0], hi = acc[i][1];
    if (epi == EPI_SILU_MUL) {
      const v16f gate = round_bf16(lo), up = round_bf16(hi);
      const v16f out = round_bf16(vsilu(gate)) * up;
      bf16* row = (bf16*)c + i * ldc;
      if (ncols >= 16) store_bf16(row, out); else store_bf16_n(row, out, ncols);
      continue;
    }
    if (bias) {
      float b[32] = {};
      memcpy(b, bias, 4 * (ncols < 32 ? ncols : 32));
      lo = lo + vload(b);
      hi = hi + vload(b + 16);
    }
    if (epi == EPI_F32) {
      float* row = (float*)c + i * ldc;
      if (ncols >= 32) {
        vstore(row, lo);
        vstore(row + 16, hi);
      } else {
        float tmp[32];
        vstore(tmp, lo);
        vstore(tmp + 16, hi);
        memcpy(row, tmp, 4 * ncols);
      }
    } else {
      bf16* row = (bf16*)c + i * ldc;
      if (ncols >= 32) {
        store_bf16(row, lo);
        store_bf16(row + 16, hi);
      } else {
        store_bf16_n(row, lo, ncols < 16 ? ncols : 16);
        if (ncols > 16) store_bf16_n(row + 16, hi, ncols - 16);
      }
    }
  }
}

static void gemm_rows(const bf16* a, int64_t lda, int64_t rows, const uint32_t* w, int64_t kp_count,
                      const float* bias, int epi, char* c, int64_t ldc_bytes, int64_t ldc, int64_t ncols) {
  constexpr int MR = 8;
  int64_t m = 0;
  for (; m + MR <= rows; m += MR)
    gemm_tile<MR>(a + m * lda, lda, w, kp_count, bias, epi, c + m * ldc_bytes, ldc, ncols);
  const int64_t left = rows - m;
  const bf16* am = a + m * lda;
  char* cm = c + m * ldc_bytes;
  switch (left) {  // the same per-row arithmetic as the 8-row tile, fewer rows at once
    case 7: gemm_tile<7>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 6: gemm_tile<6>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 5: gemm_tile<5>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 4: gemm_tile<4>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 3: gemm_tile<3>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 2: gemm_tile<2>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    case 1: gemm_tile<1>(am, lda, w, kp_count, bias, epi, cm, ldc, ncols); break;
    default: break;
  }
}

// n: output columns (of the packed blocks' 32 * num_blocks, or 16 * num_blocks for EPI_SILU_MUL).
static void gemm(const bf16* a, int64_t lda, int64_t m, int64_t k, const uint32_t* w, int64_t num_blocks, int64_t n,
                 const float* bias, int epi, void* c, int64_t ldc, int num_threads) {
  const int64_t kp_count = k / 2;
  const int64_t block_cols = epi == EPI_SILU_MUL ? 16 : 32;
  const int64_t elem = epi == EPI_F32 ? 4 : 2;
  const int64_t chunk = 256;  // rows whose A stays in L2 while a thread walks its column blocks
  const int64_t num_chunks = (m + chunk - 1) / chunk;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
  for (int64_t mc = 0; mc < num_chunks; mc++) {
    for (int64_t nb = 0; nb < num_blocks; nb++) {
      const int64_t m0 = mc * chunk, rows = (m - m0 < chunk ? m - m0 : chunk);
      const int64_t col = nb * block_cols;
      const int64_t ncols = n - col < block_cols ? n - col : block_cols;
      if (ncols <= 0) continue;
      gemm_rows(a + m0 * lda, lda, rows, w + nb * kp_count * 32, kp_count, bias ? bias + col : nullptr, epi,
                (char*)c + (m0 * ldc + col) * elem, ldc * elem, ldc, ncols);
    }
  }
}
