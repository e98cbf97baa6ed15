/* Dense with 16-bit weights (bf16 or fp16) and fp32 activations and sums: half the bytes of
 * fp32 weights for the layers bound by reading them (batch-1 GEMVs). AVX-512 converts a panel
 * row to fp32 in registers (bf16: a 16-bit shift; fp16: vcvtph2ps); the portable path is the
 * reference. */
#include <math.h>
#include <string.h>
#include "ak_kernels.h"

static int ak_w16_fast(void) {
  __builtin_cpu_init();
  return ak_isa() == AK_ISA_AVX512 && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

const char* ak_w16_path(void) { return ak_w16_fast() ? "avx512" : "portable"; }

static float w16_to_f32(uint16_t h, int fmt) {
  uint32_t bits;
  if (fmt == AK_W16_BF16) {
    bits = (uint32_t)h << 16;
  } else { /* IEEE half -> single */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
      float v = ldexpf((float)m, -24); /* zero or subnormal half */
      return sign ? -v : v;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static void ukr_w16_portable(int mr, int64_t K, const float* a, int64_t lda, const uint16_t* bp,
                             int fmt, float* c, int64_t ldc, int nv, const float* bias,
                             const float* res, int64_t ldr, const ak_epilogue* epi) {
  float acc[AK_MR][AK_NR];
  memset(acc, 0, sizeof(acc));
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < nv; ++j) {
      const float w = w16_to_f32(bp[k * AK_NR + j], fmt);
      for (int i = 0; i < mr; ++i) acc[i][j] += a[i * lda + k] * w;
    }
  ak_epilogue e = *epi;
  e.scale = 1.f;
  float row[AK_NR];
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nv; ++j) row[j] = epi->scale * acc[i][j] + (bias ? bias[j] : 0.f);
    ak_portable_table.row_epi(c + i * ldc, row, nv, 0.f, res ? res + i * ldr : NULL, &e);
  }
}

typedef struct {
  const float *x, *bias, *res;
  const uint16_t* wh;
  float* out;
  int64_t M, K, N;
  int fmt;
  ak_epilogue epi;
  ak_ukr_w16_fn ukr;
} ak_w16_job;

/* Work item = one weight panel over every row: each weight is read once per call. */
static void w16_range(int64_t begin, int64_t end, void* ctx) {
  const ak_w16_job* j = (const ak_w16_job*)ctx;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n0 = p * AK_NR;
    const int nv = (int)(j->N - n0 < AK_NR ? j->N - n0 : AK_NR);
    const uint16_t* panel = j->wh + p * j->K * AK_NR;
    for (int64_t m0 = 0; m0 < j->M; m0 += AK_MR) {
      const int mr = (int)(j->M - m0 < AK_MR ? j->M - m0 : AK_MR);
      j->ukr(mr, j->K, j->x + m0 * j->K, j->K, panel, j->fmt, j->out + m0 * j->N + n0, j->N, nv,
             j->bias ? j->bias + n0 : NULL, j->res ? j->res + m0 * j->N + n0 : NULL, j->N, &j->epi);
    }
  }
}

void ak_dense_w16_f32(const float* x, int64_t M, int64_t K, const uint16_t* wh, int fmt, int64_t N,
                      const float* bias, const float* res, float* out, ak_epilogue epi,
                      ak_tuning tune) {
  if (M <= 0 || N <= 0) return;
  ak_w16_job j = {x, bias, res, wh, out, M, K, N, fmt, epi,
                  ak_w16_fast() ? ak_ukr_w16_avx512 : ukr_w16_portable};
  ak_parallel_range_n(w16_range, &j, (N + AK_NR - 1) / AK_NR, tune.threads);
}
