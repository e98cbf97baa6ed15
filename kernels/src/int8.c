/* int8 dense: rows of x quantized to u8 at run time (each row's own range, or one range calibrated
 * at compile time), per-channel s8 weights packed at compile time, int32 sums (AVX512-VNNI
 * vpdpbusd, or portable C), dequantized into the fp32 epilogue. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "ak_kernels.h"

static int ak_has_vnni(void) {
  __builtin_cpu_init();
  return ak_isa() == AK_ISA_AVX512 && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

const char* ak_int8_path(void) { return ak_has_vnni() ? "vnni" : "portable"; }

static void quant_rows_portable(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                float* scale, int32_t* zp);
static void quant_fixed_portable(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                 float inv, int32_t z);
static void ukr_i8_portable(int mr, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* bp,
                            float* c, int64_t ldc, int nv, const float* a_scale,
                            const int32_t* a_zp, const float* w_scale, const float* w_sum,
                            const float* bias, const float* res, int64_t ldr,
                            const ak_epilogue* epi);

const ak_int8_table* ak_int8(void) {
  static const ak_int8_table vnni = {ak_quant_rows_avx512, ak_quant_fixed_avx512, ak_ukr_i8_vnni};
  static const ak_int8_table portable = {quant_rows_portable, quant_fixed_portable, ukr_i8_portable};
  return ak_has_vnni() ? &vnni : &portable;
}

/* ---- portable pieces (the reference the vector ones match) -------------------------------- */

static void quant_rows_portable(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                float* scale, int32_t* zp) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * K;
    float mn = 0.f, mx = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      mn = xr[k] < mn ? xr[k] : mn;
      mx = xr[k] > mx ? xr[k] : mx;
    }
    float s = (mx - mn) / 255.f;
    if (!(s > 0.f) || !isfinite(s)) s = 1.f;
    const float inv = 1.f / s;
    int32_t z = (int32_t)nearbyintf(-mn * inv);
    z = z < 0 ? 0 : (z > 255 ? 255 : z);
    scale[r] = s;
    zp[r] = z;
    uint8_t* qr = q + r * ldq;
    for (int64_t k = 0; k < K; ++k) {
      float v = nearbyintf(xr[k] * inv) + (float)z;
      v = v > 0.f ? (v > 255.f ? 255.f : v) : 0.f; /* NaN -> 0, as the vector path */
      qr[k] = (uint8_t)v;
    }
    for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
  }
}

static void quant_fixed_portable(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                 float inv, int32_t z) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * K;
    uint8_t* qr = q + r * ldq;
    for (int64_t k = 0; k < K; ++k) {
      float v = xr[k] * inv;
      v = v > -256.f ? (v < 256.f ? v : 256.f) : -256.f; /* NaN -> -256 -> 0, as the vector path */
      v = nearbyintf(v) + (float)z;
      qr[k] = (uint8_t)(v > 0.f ? (v > 255.f ? 255.f : v) : 0.f);
    }
    for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
  }
}

static void ukr_i8_portable(int mr, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* bp,
                            float* c, int64_t ldc, int nv, const float* a_scale,
                            const int32_t* a_zp, const float* w_scale, const float* w_sum,
                            const float* bias, const float* res, int64_t ldr,
                            const ak_epilogue* epi) {
  ak_epilogue e = *epi;
  e.scale = 1.f; /* applied below, before the bias */
  float row[AK_NR];
  for (int i = 0; i < mr; ++i) {
    int32_t acc[AK_NR] = {0};
    for (int64_t k = 0; k < K4; ++k) {
      const uint8_t* ak = a + i * lda + 4 * k;
      const int8_t* bk = bp + k * 4 * AK_NR;
      for (int j = 0; j < nv; ++j)
        acc[j] += ak[0] * bk[4 * j] + ak[1] * bk[4 * j + 1] + ak[2] * bk[4 * j + 2] +
                  ak[3] * bk[4 * j + 3];
    }
    for (int j = 0; j < nv; ++j)
      row[j] = epi->scale * a_scale[i] * w_scale[j] * (float)(acc[j] - a_zp[i] * (int32_t)w_sum[j]) +
               (bias ? bias[j] : 0.f);
    ak_portable_table.row_epi(c + i * ldc, row, nv, 0.f, res ? res + i * ldr : NULL, &e);
  }
}

/* ---- driver ------------------------------------------------------------------------------- */

typedef struct {
  const float* x;
  int64_t K, ldq;
  uint8_t* q;
  float* scale;  /* dynamic: each row's grid out; NULL for a fixed grid */
  int32_t* zp;
  float inv;     /* fixed grid */
  int32_t z;
  const ak_int8_table* i8;
} ak_quant_job;

static void quant_range(int64_t begin, int64_t end, void* ctx) {
  const ak_quant_job* j = (const ak_quant_job*)ctx;
  if (j->scale)
    j->i8->quant_rows(j->x + begin * j->K, end - begin, j->K, j->q + begin * j->ldq, j->ldq,
                      j->scale + begin, j->zp + begin);
  else
    j->i8->quant_fixed(j->x + begin * j->K, end - begin, j->K, j->q + begin * j->ldq, j->ldq, j->inv,
                       j->z);
}

void ak_quant_fixed_rows(const ak_int8_table* i8, const float* x, int64_t rows, int64_t K, uint8_t* q,
                         int64_t ldq, const float* xq, int threads) {
  ak_quant_job qj = {x, K, ldq, q, NULL, NULL, 1.f / xq[0], (int32_t)xq[1], i8};
  ak_parallel_range_n(quant_range, &qj, rows, rows * K >= 16384 ? threads : 1);
}

void ak_ukr_i8_u8(const ak_int8_table* i8, int mr, int64_t K4, const uint8_t* a, int64_t lda,
                  const int8_t* bp, uint8_t* c, int64_t ldc, int nv, const float* a_scale,
                  const int32_t* a_zp, const float* w_scale, const float* w_sum, const float* bias,
                  const ak_epilogue* epi, float inv, int32_t z) {
  float tile[AK_MR * AK_NR] __attribute__((aligned(64)));
  i8->ukr(mr, K4, a, lda, bp, tile, AK_NR, nv, a_scale, a_zp, w_scale, w_sum, bias, NULL, AK_NR, epi);
  for (int r = 0; r < mr; ++r) i8->quant_fixed(tile + r * AK_NR, 1, nv, c + r * ldc, nv, inv, z);
}

typedef struct {
  const uint8_t* q;
  const float* a_scale;
  const int32_t* a_zp;
  const int8_t* wq;
  const float *w_scale, *w_sum, *bias, *res;
  float* out;
  uint8_t* out_u8; /* a u8 output (yq), else NULL */
  float y_inv;
  int32_t y_zp;
  int64_t M, N, K4, ldq, P, mrows, mchunks;
  ak_epilogue epi;
  const ak_int8_table* i8;
} ak_i8_job;

/* Work item = (weight panel, chunk of rows), rows inner: a thread's panels are read once, the
 * quantized rows (M x K bytes) stay in L2 while its panels sweep them. */
static void i8_range(int64_t begin, int64_t end, void* ctx) {
  const ak_i8_job* j = (const ak_i8_job*)ctx;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t p = idx / j->mchunks, mc = idx % j->mchunks;
    const int64_t n0 = p * AK_NR;
    const int nv = (int)(j->N - n0 < AK_NR ? j->N - n0 : AK_NR);
    const int8_t* panel = j->wq + p * j->K4 * 4 * AK_NR;
    const int64_t m_begin = mc * j->mrows, m_end = m_begin + j->mrows < j->M ? m_begin + j->mrows : j->M;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += AK_MR) {
      const int mr = (int)(m_end - m0 < AK_MR ? m_end - m0 : AK_MR);
      if (j->out_u8) {
        ak_ukr_i8_u8(j->i8, mr, j->K4, j->q + m0 * j->ldq, j->ldq, panel, j->out_u8 + m0 * j->N + n0,
                     j->N, nv, j->a_scale + m0, j->a_zp + m0, j->w_scale + n0, j->w_sum + n0,
                     j->bias ? j->bias + n0 : NULL, &j->epi, j->y_inv, j->y_zp);
        continue;
      }
      j->i8->ukr(mr, j->K4, j->q + m0 * j->ldq, j->ldq, panel, j->out + m0 * j->N + n0, j->N, nv,
                 j->a_scale + m0, j->a_zp + m0, j->w_scale + n0, j->w_sum + n0,
                 j->bias ? j->bias + n0 : NULL, j->res ? j->res + m0 * j->N + n0 : NULL, j->N, &j->epi);
    }
  }
}

int ak_dense_u8s8_f32(const void* x, int x_u8, int64_t M, int64_t K, const int8_t* wq,
                      const float* qp, const float* xq, const float* yq, int64_t N,
                      const float* bias, const float* res, void* out, ak_epilogue epi,
                      ak_tuning tune) {
  if (M <= 0 || N <= 0) return 0;
  if (x_u8 && (!xq || K % 4 != 0)) return -2; /* the FFI refuses these first */
  if (yq) epi.res_mode = AK_RES_NONE;        /* a u8 out takes no residual */
  const ak_int8_table* i8 = ak_int8();
  const int64_t K4 = (K + 3) / 4, ldq = K4 * 4, P = (N + AK_NR - 1) / AK_NR;
  /* u8 rows given (x_u8, K % 4 == 0 checked by the caller): no copy, only the row grids */
  const size_t qbytes = x_u8 ? 0 : ((size_t)(M * ldq) + 63) & ~(size_t)63;
  const size_t rbytes = ((size_t)M * sizeof(float) + 63) & ~(size_t)63;
  uint8_t* mem = (uint8_t*)aligned_alloc(64, qbytes + 2 * rbytes);
  if (!mem) return -1;
  float* a_scale = (float*)(mem + qbytes);
  int32_t* a_zp = (int32_t*)(mem + qbytes + rbytes);
  const int pool = ak_num_threads();
  const int threads = tune.threads > 0 && tune.threads < pool ? tune.threads : pool;
  if (xq) { /* one grid: the rows as given (u8) or quantized on it */
    for (int64_t r = 0; r < M; ++r) {
      a_scale[r] = xq[0];
      a_zp[r] = (int32_t)xq[1];
    }
    if (!x_u8) ak_quant_fixed_rows(i8, (const float*)x, M, K, mem, ldq, xq, threads);
  } else {
    ak_quant_job qj = {(const float*)x, K, ldq, mem, a_scale, a_zp, 0.f, 0, i8};
    ak_parallel_range_n(quant_range, &qj, M, M * K >= 16384 ? threads : 1);
  }
  ak_i8_job j;
  memset(&j, 0, sizeof(j));
  j.q = x_u8 ? (const uint8_t*)x : mem; j.a_scale = a_scale; j.a_zp = a_zp; j.wq = wq;
  j.w_scale = qp; j.w_sum = qp + P * AK_NR; j.bias = bias; j.res = res;
  if (yq) {
    j.out_u8 = (uint8_t*)out;
    j.y_inv = 1.f / yq[0];
    j.y_zp = (int32_t)yq[1];
    j.res = NULL;
  } else {
    j.out = (float*)out;
  }
  j.M = M; j.N = N; j.K4 = K4; j.ldq = ldq; j.P = P;
  j.epi = epi;
  j.i8 = i8;
  /* row chunks: enough items for every thread (grain x threads), whole micro-tiles */
  const int64_t want = (int64_t)(tune.grain > 0 ? tune.grain : 4) * threads;
  int64_t mchunks = P >= want ? 1 : (want + P - 1) / P;
  const int64_t mtiles = (M + AK_MR - 1) / AK_MR;
  if (mchunks > mtiles) mchunks = mtiles;
  j.mrows = (mtiles + mchunks - 1) / mchunks * AK_MR;
  j.mchunks = (M + j.mrows - 1) / j.mrows;
  ak_parallel_range_n(i8_range, &j, P * j.mchunks, threads);
  free(mem);
  return 0;
}
