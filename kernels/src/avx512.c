/* AVX-512 micro-kernel (AK_MR x AK_NR = 8 x 32 accumulators in 16 zmm registers), vector
 * epilogues (exp/erf/sigmoid in registers) and row kernels. Only called after ak_isa() checked
 * the CPU; the whole file is compiled for AVX-512F. */
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "ak_kernels.h"

#define AK_INLINE static inline __attribute__((always_inline))

AK_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* exp(x), |rel err| < 2e-7 on [-87, 88]: 2^n * p(r), r = x - n ln2, degree-7 Taylor. */
AK_INLINE __m512 v_exp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)),
                    _mm512_set1_ps(-87.3365447505531f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

AK_INLINE __m512 v_sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* erf(x) via erfc(|x|) = t exp(-z^2 + P(t)), t = 1/(1 + z/2) (Numerical Recipes erfcc,
 * fractional error < 1.2e-7). */
AK_INLINE __m512 v_erf(__m512 x) {
  const __m512 z = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  p = _mm512_fnmadd_ps(z, z, p);
  const __m512 erfc = _mm512_mul_ps(t, v_exp(p));
  const __m512 e = _mm512_sub_ps(_mm512_set1_ps(1.f), erfc);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_ps(e, neg, _mm512_setzero_ps(), e);
}

AK_INLINE __m512 v_act(__m512 v, const ak_epilogue* e) {
  switch (e->act) {
    case AK_ACT_RELU: return _mm512_max_ps(v, _mm512_setzero_ps());
    case AK_ACT_CLIP:
      return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(e->lo)), _mm512_set1_ps(e->hi));
    case AK_ACT_GELU_ERF: {
      const __m512 h = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(h, v_erf(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f))), h);
    }
    case AK_ACT_GELU_TANH: {  /* 0.5x(1 + tanh(u)) = x * sigmoid(2u) */
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v),
                                     _mm512_set1_ps(2.f * 0.7978845608028654f));
      return _mm512_mul_ps(v, v_sigmoid(u));
    }
    case AK_ACT_SILU: return _mm512_mul_ps(v, v_sigmoid(v));
    case AK_ACT_SIGMOID: return v_sigmoid(v);
    case AK_ACT_QUICK_GELU: return _mm512_mul_ps(v, v_sigmoid(_mm512_mul_ps(v, _mm512_set1_ps(1.702f))));
    default: return v;
  }
}

AK_INLINE __m512 v_epi(__m512 v, __m512 bias, const float* res, __mmask16 m, const ak_epilogue* e) {
  v = _mm512_fmadd_ps(v, _mm512_set1_ps(e->scale), bias);
  if (e->res_mode == AK_RES_PRE_ACT) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res));
  v = v_act(v, e);
  if (e->res_mode == AK_RES_POST_ACT) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res));
  else if (e->res_mode == AK_RES_MUL) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, res));
  return v;
}

AK_INLINE void ukr_body(const int PF, const int SEG, const int MR, const int APACK, const int HALF, int64_t K, const float* a,
                        int64_t lda, const float* bp,
                        float* c, int64_t ldc, int nv, const float* bias_col,
                        const float* bias_row, const float* res, int64_t ldr,
                        const ak_epilogue* epi) {
  const __mmask16 m0 = tail_mask(nv), m1 = nv > 16 ? tail_mask(nv - 16) : 0;
  __m512 acc0[AK_MR], acc1[AK_MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  if (epi->accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc0[i] = _mm512_maskz_loadu_ps(m0, c + i * ldc);
      if (!HALF) acc1[i] = _mm512_maskz_loadu_ps(m1, c + i * ldc + 16);
    }
  }
  const char* pf = epi->pf;
  const int nseg = SEG ? epi->nseg : 1;
  for (int s = 0; s < nseg; ++s) {
    const float* as = SEG ? a + s * epi->seg_lda : a;
    const float* bs = SEG ? bp + s * K * AK_NR : bp;
    const float* ar[AK_MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) ar[i] = as + i * lda;
    for (int64_t k = 0; k < K; ++k) {
      if (PF) _mm_prefetch(pf + k * 64, _MM_HINT_T1);
      const __m512 b0 = _mm512_load_ps(bs + k * AK_NR);
      const __m512 b1 = HALF ? b0 : _mm512_load_ps(bs + k * AK_NR + 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(APACK ? as[k * AK_MR + i] : ar[i][k]);
        acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
        if (!HALF) acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
      }
    }
  }
  if (epi->raw) { /* a partial sum over a K block: the next block adds to it */
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
      if (m1) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
    }
    return;
  }
  __m512 bc0 = _mm512_setzero_ps(), bc1 = _mm512_setzero_ps();
  if (bias_col) {
    bc0 = _mm512_maskz_loadu_ps(m0, bias_col);
    bc1 = _mm512_maskz_loadu_ps(m1, bias_col + 16);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    __m512 b0 = bc0, b1 = bc1;
    if (bias_row) b0 = b1 = _mm512_set1_ps(bias_row[i]);
    const float* r = res ? res + i * ldr : NULL;
    _mm512_mask_storeu_ps(c + i * ldc, m0, v_epi(acc0[i], b0, r, m0, epi));
    if (m1) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, v_epi(acc1[i], b1, r ? r + 16 : r, m1, epi));
  }
}

/* One instantiation per (rows, packed A, half panel): a panel with <= 16 valid columns (the last
 * one of N = 196, 49, ...) computes one vector per row instead of two. */
AK_INLINE void ukr_dispatch(const int PF, const int SEG, int mr, int64_t K, const float* a, int64_t lda,
                            const float* bp, float* c, int64_t ldc, int nv, const float* bias_col,
                            const float* bias_row, const float* res, int64_t ldr,
                            const ak_epilogue* epi) {
  const int apack = lda == 0, half = nv <= 16;
#define AK_CASE(n, p, h)                                                                      \
  case n: ukr_body(PF, SEG, n, p, h, K, a, lda, bp, c, ldc, nv, bias_col, bias_row, res, ldr, epi); break;
#define AK_SWITCH(p, h)                                                                       \
  switch (mr) {                                                                               \
    AK_CASE(8, p, h) AK_CASE(7, p, h) AK_CASE(6, p, h) AK_CASE(5, p, h) AK_CASE(4, p, h)      \
    AK_CASE(3, p, h) AK_CASE(2, p, h) AK_CASE(1, p, h) default: break;                        \
  }
  if (SEG && apack) return; /* segments: row-major A only (the drivers never ask otherwise) */
  if (!SEG && apack && half) { AK_SWITCH(1, 1) }
  else if (!SEG && apack) { AK_SWITCH(1, 0) }
  else if (half) { AK_SWITCH(0, 1) }
  else { AK_SWITCH(0, 0) }
#undef AK_SWITCH
#undef AK_CASE
}

static void ukr_avx512(int mr, int64_t K, const float* a, int64_t lda, const float* bp, float* c,
                       int64_t ldc, int nv, const float* bias_col, const float* bias_row,
                       const float* res, int64_t ldr, const ak_epilogue* epi) {
  if (epi->nseg > 1) ukr_dispatch(0, 1, mr, K, a, lda, bp, c, ldc, nv, bias_col, bias_row, res, ldr, epi);
  else if (epi->pf) ukr_dispatch(1, 0, mr, K, a, lda, bp, c, ldc, nv, bias_col, bias_row, res, ldr, epi);
  else ukr_dispatch(0, 0, mr, K, a, lda, bp, c, ldc, nv, bias_col, bias_row, res, ldr, epi);
}

static void row_epi_avx512(float* dst, const float* src, int64_t n, float bias, const float* res,
                           const ak_epilogue* epi) {
  const __m512 b = _mm512_set1_ps(bias);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    _mm512_mask_storeu_ps(dst + j, m, v_epi(v, b, res ? res + j : NULL, m, epi));
  }
}


static void layer_norm_row_avx512(const float* x, const float* gamma, const float* beta,
                                  float* out, int64_t D, float eps) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask(D - j), x + j));
  const float mean = _mm512_reduce_add_ps(s) / (float)D;
  const __m512 mv = _mm512_set1_ps(mean);
  __m512 s2 = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + j), mv);
    s2 = _mm512_fmadd_ps(d, d, s2);
  }
  const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(s2) / (float)D + eps));
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), mv), inv);
    if (gamma) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, gamma + j));
    if (beta) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, beta + j));
    _mm512_mask_storeu_ps(out + j, m, v);
  }
}

static void rms_norm_row_avx512(const float* x, const float* gamma, const float* beta,
                                float* out, int64_t D, float eps) {
  (void)beta;
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();  /* two chains: FMA latency */
  int64_t j = 0;
  for (; j + 32 <= D; j += 32) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    s0 = _mm512_fmadd_ps(a, a, s0);
    s1 = _mm512_fmadd_ps(b, b, s1);
  }
  for (; j < D; j += 16) {
    const __m512 a = _mm512_maskz_loadu_ps(tail_mask(D - j), x + j);
    s0 = _mm512_fmadd_ps(a, a, s0);
  }
  const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)D + eps));
  for (j = 0; j < D; j += 16) {
    const __mmask16 m = tail_mask(D - j);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), inv);
    if (gamma) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, gamma + j));
    _mm512_mask_storeu_ps(out + j, m, v);
  }
}

static void softmax_row_avx512(const float* x, const float* gamma, const float* beta, float* out,
                               int64_t D, float eps) {
  (void)gamma; (void)beta; (void)eps;
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < D; j += 16)
    mx = _mm512_mask_max_ps(mx, tail_mask(D - j), mx, _mm512_maskz_loadu_ps(tail_mask(D - j), x + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 k = tail_mask(D - j);
    const __m512 e = _mm512_maskz_mov_ps(k, v_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), m)));
    s = _mm512_add_ps(s, e);
    _mm512_mask_storeu_ps(out + j, k, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(s));
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 k = tail_mask(D - j);
    _mm512_mask_storeu_ps(out + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, out + j), inv));
  }
}

/* NR rows of softmax_row_avx512 at once, interleaved: one row's reductions and exp chains
 * overlap the others'. Per row the same operations in the same order, so the same bits (for
 * non-finite rows too: v_exp's clamps map a NaN difference as softmax_row does). */
AK_INLINE void softmax_rows_body(const int NR, const float* x, float* out, int64_t ld, int64_t D) {
  const int64_t full = D & ~(int64_t)15;
  const __mmask16 tail = tail_mask(D - full);
  __m512 mx[4], sum[4], mv[4];
  for (int r = 0; r < NR; ++r) mx[r] = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 16)
    for (int r = 0; r < NR; ++r) mx[r] = _mm512_max_ps(mx[r], _mm512_loadu_ps(x + r * ld + j));
  if (tail)
    for (int r = 0; r < NR; ++r)
      mx[r] = _mm512_mask_max_ps(mx[r], tail, mx[r], _mm512_maskz_loadu_ps(tail, x + r * ld + full));
  for (int r = 0; r < NR; ++r) {
    mv[r] = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
    sum[r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < full; j += 16)
    for (int r = 0; r < NR; ++r) {
      const __m512 e = v_exp(_mm512_sub_ps(_mm512_loadu_ps(x + r * ld + j), mv[r]));
      sum[r] = _mm512_add_ps(sum[r], e);
      _mm512_storeu_ps(out + r * ld + j, e);
    }
  if (tail)
    for (int r = 0; r < NR; ++r) {
      const __m512 e = _mm512_maskz_mov_ps(
          tail, v_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + r * ld + full), mv[r])));
      sum[r] = _mm512_add_ps(sum[r], e);
      _mm512_mask_storeu_ps(out + r * ld + full, tail, e);
    }
  for (int r = 0; r < NR; ++r) mv[r] = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum[r]));
  for (int64_t j = 0; j < full; j += 16)
    for (int r = 0; r < NR; ++r)
      _mm512_storeu_ps(out + r * ld + j, _mm512_mul_ps(_mm512_loadu_ps(out + r * ld + j), mv[r]));
  if (tail)
    for (int r = 0; r < NR; ++r)
      _mm512_mask_storeu_ps(out + r * ld + full, tail,
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, out + r * ld + full), mv[r]));
}

static void softmax_rows_avx512(const float* x, float* out, int64_t ld, int64_t rows, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) softmax_rows_body(4, x + r * ld, out + r * ld, ld, D);
  for (; r < rows; ++r) softmax_rows_body(1, x + r * ld, out + r * ld, ld, D);
}

static void dw_plane_avx512(const float* pad, int64_t Wp, const float* w, const ak_conv_geom* g,
                            float bias, const float* res, float* out, const ak_epilogue* epi) {
  const __m512 b = _mm512_set1_ps(bias);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i strided = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)g->SW));
  const int64_t taps = g->KH * g->KW;
  for (int64_t oy = 0; oy < g->OH; ++oy) {
    float* o = out + oy * g->OW;
    const float* r = res ? res + oy * g->OW : NULL;
    for (int64_t ox0 = 0; ox0 < g->OW; ox0 += 16) {
      const __mmask16 m = tail_mask(g->OW - ox0);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t ky = t / g->KW, kx = t % g->KW;
        const float* src = pad + (oy * g->SH + ky * g->DH) * Wp + ox0 * g->SW + kx * g->DW;
        __m512 v;
        if (g->SW == 1) v = _mm512_loadu_ps(src);
        else if (g->SW == 2)
          v = _mm512_permutex2var_ps(_mm512_loadu_ps(src), even, _mm512_loadu_ps(src + 16));
        else v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, strided, src, 4);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), v, acc);
      }
      _mm512_mask_storeu_ps(o + ox0, m, v_epi(acc, b, r ? r + ox0 : NULL, m, epi));
    }
  }
}

/* dst[0, len) = (0 <= t < lo or hi <= t) ? 0 : src[t], len <= 32, unit stride, masked ops. */
AK_INLINE void run_copy(float* dst, const float* src, int64_t lo, int64_t hi, int64_t len) {
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const __mmask16 in_len = tail_mask(len - t0);
    const int64_t a = lo - t0 < 0 ? 0 : lo - t0, b = hi - t0 < 0 ? 0 : hi - t0;
    const __mmask16 valid = (__mmask16)(tail_mask(b) & ~tail_mask(a)) & in_len;
    _mm512_mask_storeu_ps(dst + t0, in_len, _mm512_maskz_loadu_ps(valid, src + t0));
  }
}

/* The same for input stride 2: dst[t] = src[2t] for lo <= t < hi, via two masked loads of 16
 * and one vpermt2ps per 16 outputs (masked gathers measured slower than scalar copies). */
AK_INLINE void run_copy_s2(float* dst, const float* src, int64_t lo, int64_t hi, int64_t len) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const __mmask16 in_len = tail_mask(len - t0);
    /* input offsets u = 2t, valid for u in [2 lo, 2 hi - 1); this block reads [2 t0, 2 t0 + 32) */
    const int64_t ua = 2 * lo - 2 * t0, ub = 2 * hi - 1 - 2 * t0;
    const int64_t a0 = ua < 0 ? 0 : ua, b0 = ub < 0 ? 0 : ub;
    const int64_t a1 = ua - 16 < 0 ? 0 : ua - 16, b1 = ub - 16 < 0 ? 0 : ub - 16;
    const __mmask16 m0 = hi > lo ? (__mmask16)(tail_mask(b0) & ~tail_mask(a0)) : 0;
    const __mmask16 m1 = hi > lo ? (__mmask16)(tail_mask(b1) & ~tail_mask(a1)) : 0;
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, src + 2 * t0);
    const __m512 v1 = _mm512_maskz_loadu_ps(m1, src + 2 * t0 + 16);
    _mm512_mask_storeu_ps(dst + t0, in_len, _mm512_permutex2var_ps(v0, even, v1));
  }
}

static void im2col_avx512(const ak_conv_geom* cg, const float* x, int64_t n0, int64_t nv,
                          float* dst) {
  if (cg->SW > 2) {
    ak_im2col_portable(cg, x, n0, nv, dst);
    return;
  }
  const int64_t SW = cg->SW;
  ak_im2col_run run[AK_NR];
  const int runs = ak_im2col_runs(cg, n0, nv, run);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < cg->C; ++c) {
    const float* xc = x + c * cg->H * cg->W;
    for (int64_t ky = 0; ky < cg->KH; ++ky) {
      for (int64_t kx = 0; kx < cg->KW; ++kx) {
        float* d = dst + ((c * cg->KH + ky) * cg->KW + kx) * AK_NR;
        _mm512_store_ps(d, zero); /* zeros past nv; runs overwrite the rest */
        _mm512_store_ps(d + 16, zero);
        for (int r = 0; r < runs; ++r) {
          const int64_t iy = run[r].oy * cg->SH - cg->PH + ky * cg->DH;
          if (iy < 0 || iy >= cg->H) continue;
          const int64_t ix0 = run[r].ox * SW - cg->PW + kx * cg->DW;
          if (SW == 1) {
            run_copy(d + run[r].j, xc + iy * cg->W + ix0, ix0 < 0 ? -ix0 : 0, cg->W - ix0,
                     run[r].len);
          } else { /* valid t: 0 <= ix0 + 2t < W */
            const int64_t lo = ix0 < 0 ? (1 - ix0) >> 1 : 0;
            const int64_t hi = ix0 > cg->W - 1 ? 0 : ((cg->W - 1 - ix0) >> 1) + 1;
            run_copy_s2(d + run[r].j, xc + iy * cg->W + ix0, lo < run[r].len ? lo : run[r].len,
                        hi < run[r].len ? hi : run[r].len, run[r].len);
          }
        }
      }
    }
  }
}

/* NHWC depthwise: one output pixel, NV vectors of channels from c0 (the last one masked when
 * MASKED), over the taps [ky0, ky1) x [kx0, kx1) that lie inside the input; the bias, residual
 * and activation run on the accumulators before the one store. */
AK_INLINE void dw_pixel(const int NV, const int MASKED, const int FULL3, __mmask16 last,
                        const float* xrow,
                        const float* wrow, int64_t C, int64_t rowstep, int64_t colstep,
                        int64_t KW, int64_t ky0, int64_t ky1, int64_t kx0, int64_t kx1,
                        const float* bias, const float* res, float* out,
                        const ak_epilogue* epi) {
  __m512 acc[4];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  if (FULL3) { /* all three taps of a 3-wide window inside the input: unrolled */
    kx0 = 0;
    kx1 = 3;
  }
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* xr = xrow + ky * rowstep;
    const float* wr = wrow + ky * KW * C;
#pragma GCC unroll 3
    for (int64_t kx = kx0; kx < kx1; ++kx) {
      const float* src = xr + kx * colstep;
      const float* wt = wr + kx * C;
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        const int tail = MASKED && j == NV - 1;
        const __m512 xv = tail ? _mm512_maskz_loadu_ps(last, src + 16 * j) : _mm512_loadu_ps(src + 16 * j);
        const __m512 wv = tail ? _mm512_maskz_loadu_ps(last, wt + 16 * j) : _mm512_loadu_ps(wt + 16 * j);
        acc[j] = _mm512_fmadd_ps(xv, wv, acc[j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const __mmask16 m = MASKED && j == NV - 1 ? last : (__mmask16)0xFFFF;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * j) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out + 16 * j, m, v_epi(acc[j], b, res ? res + 16 * j : NULL, m, epi));
  }
}

/* NHWC depthwise, 3 taps wide, all inside the input: PX output pixels (pxstep floats apart in
 * the input) x NV whole vectors of channels at once. One pixel alone keeps only NV accumulator
 * chains busy, each 9 dependent FMAs long: with C = 32 (NV = 2) the FMA latency, not the
 * throughput, set the pace (MobileNetV2's 112x112x32 layer ran at half onnxruntime's speed).
 * PX pixels give PX x NV chains and load each weight vector once for all of them. */
AK_INLINE void dw_pixels3(const int NV, const int PX, const float* xrow, int64_t pxstep,
                          const float* wrow, int64_t C, int64_t rowstep, int64_t colstep,
                          int64_t ky0, int64_t ky1, const float* bias, const float* res,
                          float* out, const ak_epilogue* epi) {
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int p = 0; p < PX; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[p][j] = _mm512_setzero_ps();
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* xr = xrow + ky * rowstep;
    const float* wr = wrow + ky * 3 * C;
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        const __m512 wv = _mm512_loadu_ps(wr + kx * C + 16 * j);
#pragma GCC unroll 4
        for (int p = 0; p < PX; ++p)
          acc[p][j] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + p * pxstep + kx * colstep + 16 * j), wv,
                                      acc[p][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int p = 0; p < PX; ++p)
      _mm512_storeu_ps(out + p * C + 16 * j,
                       v_epi(acc[p][j], b, res ? res + p * C + 16 * j : NULL, 0xFFFF, epi));
  }
}

static void dw_nhwc_row_avx512(const float* x, const float* w, const ak_conv_geom* g,
                               int64_t channels, int64_t oy, const float* bias, const float* res,
                               float* out, const ak_epilogue* epi) {
  const int64_t C = channels, iy0 = oy * g->SH - g->PH;
  int64_t ky0 = 0, ky1 = g->KH; /* the taps whose input row exists */
  while (ky0 < ky1 && iy0 + ky0 * g->DH < 0) ++ky0;
  while (ky1 > ky0 && iy0 + (ky1 - 1) * g->DH >= g->H) --ky1;
  const int64_t rowstep = g->DH * g->W * C, colstep = g->DW * C;
  /* interior pixels, 4 at a time, for the whole vectors of channels: [px0, px1) are the output
   * pixels whose 3-wide windows lie inside the input */
  int64_t px0 = 0, px1 = 0;
  if (g->KW == 3 && C >= 16) ak_inside_cols(g, &px0, &px1);
  const int64_t cv = C / 64 * 64, cw = C / 16 * 16; /* channels in groups of 4 vectors, whole vectors */
  for (int64_t ox = px0; ox + 4 <= px1; ox += 4) {
    const float* xrow = x + (iy0 * g->W + ox * g->SW - g->PW) * C;
    const float* r = res ? res + ox * C : NULL;
    float* o = out + ox * C;
    int64_t c0 = 0;
#define AK_DW4(nv)                                                                           \
  dw_pixels3(nv, 4, xrow + c0, g->SW * C, w + c0, C, rowstep, colstep, ky0, ky1,            \
             bias ? bias + c0 : NULL, r ? r + c0 : NULL, o + c0, epi)
    for (; c0 < cv; c0 += 64) AK_DW4(4);
    switch ((cw - c0) / 16) {
      case 3: AK_DW4(3); break;
      case 2: AK_DW4(2); break;
      case 1: AK_DW4(1); break;
      default: break;
    }
#undef AK_DW4
  }
  /* the rest: edge pixels, a last group of under 4, and the channels past the whole vectors */
  const int64_t done1 = px0 + (px1 - px0) / 4 * 4;
  for (int64_t ox = 0; ox < g->OW; ++ox) {
    const int64_t cstart = ox >= px0 && ox < done1 ? cw : 0;
    if (cstart >= C) continue;
    const int64_t ix0 = ox * g->SW - g->PW;
    const int64_t kx0 = ix0 < 0 ? (-ix0 + g->DW - 1) / g->DW : 0;
    int64_t kx1 = ix0 > g->W - 1 ? 0 : (g->W - 1 - ix0) / g->DW + 1;
    if (kx1 > g->KW) kx1 = g->KW;
    /* x at tap (0, 0) of this pixel, possibly outside the input: only taps inside are read */
    const float* xrow = x + (iy0 * g->W + ix0) * C;
    float* o = out + ox * C;
    const float* r = res ? res + ox * C : NULL;
    const int full3 = g->KW == 3 && kx0 == 0 && kx1 == 3;
    for (int64_t c0 = cstart; c0 < C; c0 += 64) {
      const int64_t left = C - c0;
      const int nv = left >= 64 ? 4 : (int)((left + 15) / 16);
      const int masked = left < 64 && (left & 15) != 0;
      const __mmask16 last = tail_mask(left - 16 * (nv - 1));
#define AK_DW(n, mk, f3)                                                                    \
  dw_pixel(n, mk, f3, last, xrow + c0, w + c0, C, rowstep, colstep, g->KW, ky0, ky1, kx0,   \
           kx1, bias ? bias + c0 : NULL, r ? r + c0 : NULL, o + c0, epi)
      if (full3 && !masked) {
        switch (nv) {
          case 4: AK_DW(4, 0, 1); break;
          case 3: AK_DW(3, 0, 1); break;
          case 2: AK_DW(2, 0, 1); break;
          default: AK_DW(1, 0, 1); break;
        }
        continue;
      }
      switch (nv * 2 + masked) {
        case 8: AK_DW(4, 0, 0); break;
        case 9: AK_DW(4, 1, 0); break;
        case 6: AK_DW(3, 0, 0); break;
        case 7: AK_DW(3, 1, 0); break;
        case 4: AK_DW(2, 0, 0); break;
        case 5: AK_DW(2, 1, 0); break;
        case 2: AK_DW(1, 0, 0); break;
        default: AK_DW(1, 1, 0); break;
      }
#undef AK_DW
    }
  }
}

/* ---- Winograd F(4x4, 3x3) transforms (channels last: 16 channels per vector) --------------- */

/* r = B^T d over 6 vectors (Lavin & Gray's F(4, 3) points 0, +-1, +-2, inf) */
AK_INLINE void wino_bt6(const __m512 d0, const __m512 d1, const __m512 d2, const __m512 d3,
                        const __m512 d4, const __m512 d5, __m512 r[6]) {
  const __m512 four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f), two = _mm512_set1_ps(2.f);
  r[0] = _mm512_fmadd_ps(four, d0, _mm512_fnmadd_ps(five, d2, d4));
  r[1] = _mm512_fnmadd_ps(four, _mm512_add_ps(d1, d2), _mm512_add_ps(d3, d4));
  r[2] = _mm512_fmadd_ps(four, _mm512_sub_ps(d1, d2), _mm512_sub_ps(d4, d3));
  r[3] = _mm512_fmadd_ps(two, _mm512_sub_ps(d3, d1), _mm512_sub_ps(d4, d2));
  r[4] = _mm512_fnmadd_ps(two, _mm512_sub_ps(d3, d1), _mm512_sub_ps(d4, d2));
  r[5] = _mm512_fmadd_ps(four, d1, _mm512_fnmadd_ps(five, d3, d5));
}

/* o = A^T m over 6 vectors -> 4 */
AK_INLINE void wino_at6(const __m512 m0, const __m512 m1, const __m512 m2, const __m512 m3,
                        const __m512 m4, const __m512 m5, __m512 o[4]) {
  const __m512 s12 = _mm512_add_ps(m1, m2), d12 = _mm512_sub_ps(m1, m2);
  const __m512 s34 = _mm512_add_ps(m3, m4), d34 = _mm512_sub_ps(m3, m4);
  o[0] = _mm512_add_ps(_mm512_add_ps(m0, s12), s34);
  o[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.f), d34, d12);
  o[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.f), s34, s12);
  o[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.f), d34, d12), m5);
}

static void wino_in_avx512(const float* x, int64_t H, int64_t W, int64_t C, int64_t iy0,
                           int64_t ix0, float* v, int64_t vstride) {
  int rows = 0, cols = 0; /* bit i: patch row / column i lies inside the input */
  for (int i = 0; i < 6; ++i) {
    if (iy0 + i >= 0 && iy0 + i < H) rows |= 1 << i;
    if (ix0 + i >= 0 && ix0 + i < W) cols |= 1 << i;
  }
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = tail_mask(C - c0);
    __m512 t[6][6]; /* t[i][j] = (B^T d)[i][j] */
    for (int j = 0; j < 6; ++j) {
      __m512 d[6];
      const int col = (cols >> j) & 1;
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i)
        d[i] = col && ((rows >> i) & 1)
                   ? _mm512_maskz_loadu_ps(m, x + ((iy0 + i) * W + ix0 + j) * C + c0)
                   : _mm512_setzero_ps();
      __m512 r[6];
      wino_bt6(d[0], d[1], d[2], d[3], d[4], d[5], r);
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) t[i][j] = r[i];
    }
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      __m512 r[6];
      wino_bt6(t[i][0], t[i][1], t[i][2], t[i][3], t[i][4], t[i][5], r);
#pragma GCC unroll 6
      for (int j = 0; j < 6; ++j) _mm512_mask_storeu_ps(v + (i * 6 + j) * vstride + c0, m, r[j]);
    }
  }
}

static void wino_out_avx512(const float* mt, int64_t mstride, int64_t nc, float* out,
                            const float* res, int64_t OH, int64_t OW, int64_t ldo, int64_t oy0,
                            int64_t ox0, const float* bias, const ak_epilogue* epi) {
  const int64_t ny = OH - oy0 < 4 ? OH - oy0 : 4, nx = OW - ox0 < 4 ? OW - ox0 : 4;
  for (int64_t c0 = 0; c0 < nc; c0 += 16) {
    const __mmask16 m = tail_mask(nc - c0);
    __m512 s[4][6]; /* s[i][j] = (A^T M)[i][j] */
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) {
      const float* p = mt + j * mstride + c0;
      __m512 o[4];
      wino_at6(_mm512_loadu_ps(p), _mm512_loadu_ps(p + 6 * mstride),
               _mm512_loadu_ps(p + 12 * mstride), _mm512_loadu_ps(p + 18 * mstride),
               _mm512_loadu_ps(p + 24 * mstride), _mm512_loadu_ps(p + 30 * mstride), o);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) s[i][j] = o[i];
    }
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
    for (int64_t i = 0; i < ny; ++i) {
      __m512 y[4];
      wino_at6(s[i][0], s[i][1], s[i][2], s[i][3], s[i][4], s[i][5], y);
      for (int64_t j = 0; j < nx; ++j) {
        const int64_t at = ((oy0 + i) * OW + ox0 + j) * ldo + c0;
        _mm512_mask_storeu_ps(out + at, m, v_epi(y[j], b, res ? res + at : NULL, m, epi));
      }
    }
  }
}

/* Attention's K^T panels: per column c, the 32 rows of a panel by two gathers (lds < 2^25, so
 * the byte offsets fit the gather's int32 indices). */
static void pack_t_avx512(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int)lds));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r0 = 0; r0 < rows; r0 += AK_NR) {
    float* d = dst + (r0 / AK_NR) * cols * AK_NR;
    const int64_t nv = rows - r0 < AK_NR ? rows - r0 : AK_NR;
    const __mmask16 m0 = tail_mask(nv), m1 = nv > 16 ? tail_mask(nv - 16) : 0;
    const float* s0 = src + r0 * lds;
    const float* s1 = nv > 16 ? s0 + 16 * lds : s0;
    for (int64_t c = 0; c < cols; ++c) {
      _mm512_store_ps(d + c * AK_NR, _mm512_mask_i32gather_ps(zero, m0, idx, s0 + c, 4));
      _mm512_store_ps(d + c * AK_NR + 16, _mm512_mask_i32gather_ps(zero, m1, idx, s1 + c, 4));
    }
  }
}

const ak_isa_table ak_avx512_table = {ukr_avx512, im2col_avx512, dw_plane_avx512, row_epi_avx512, layer_norm_row_avx512,
                                      softmax_row_avx512, dw_nhwc_row_avx512,
                                      wino_in_avx512, wino_out_avx512, AK_MR, 1, pack_t_avx512,
                                      softmax_rows_avx512, rms_norm_row_avx512};

/* ---- int8: row quantization and the AVX512-VNNI micro-kernel ------------------------------ */

/* only called where the CPU has AVX512-VNNI (and so BW and VL): see ak_int8_path */
#define AK_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

AK_VNNI void ak_quant_rows_avx512(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                          float* scale, int32_t* zp) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * K;
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(m, xr + k);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
    }
    const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi);
    float s = (mx - mn) / 255.f;
    if (!(s > 0.f) || !isfinite(s)) s = 1.f; /* an all-zero row (or a non-finite one) */
    const float inv = 1.f / s;
    int32_t z = (int32_t)nearbyintf(-mn * inv);
    z = z < 0 ? 0 : (z > 255 ? 255 : z);
    scale[r] = s;
    zp[r] = z;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512(),
                  v255 = _mm512_set1_epi32(255);
    uint8_t* qr = q + r * ldq;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(m, xr + k);
      __m512i iv = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), vz);
      iv = _mm512_min_epi32(_mm512_max_epi32(iv, v0), v255);
      _mm_mask_storeu_epi8(qr + k, m, _mm512_cvtepi32_epi8(iv));
    }
    for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
  }
}

AK_VNNI void ak_quant_fixed_avx512(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                   float inv, int32_t z) {
  /* values outside the calibrated range saturate; the float clamp first keeps huge ones (and
   * NaN, which _mm512_max_ps replaces by its second operand) out of the int32 conversion */
  const __m512 vinv = _mm512_set1_ps(inv), flo = _mm512_set1_ps(-256.f), fhi = _mm512_set1_ps(256.f);
  const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512(), v255 = _mm512_set1_epi32(255);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * K;
    uint8_t* qr = q + r * ldq;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + k), vinv), flo), fhi);
      __m512i iv = _mm512_add_epi32(_mm512_cvtps_epi32(v), vz);
      iv = _mm512_min_epi32(_mm512_max_epi32(iv, v0), v255);
      _mm_mask_storeu_epi8(qr + k, m, _mm512_cvtepi32_epi8(iv));
    }
    for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
  }
}

AK_VNNI AK_INLINE void ukr_i8_body(const int MR, const int HALF, int64_t K4, const uint8_t* a,
                                   int64_t lda, const int8_t* bp, float* c, int64_t ldc, int nv,
                                   const float* a_scale, const int32_t* a_zp,
                                   const float* w_scale, const float* w_sum, const float* bias,
                                   const float* res, int64_t ldr, const ak_epilogue* epi) {
  const __mmask16 m0 = tail_mask(nv), m1 = nv > 16 ? tail_mask(nv - 16) : 0;
  __m512i acc0[AK_MR], acc1[AK_MR];
  if (MR == 8 && !HALF) {
    /* the full tile's K loop in assembly: gcc keeps the 16 accumulators of the intrinsics loop
     * in registers only by copying them around (30 moves and 2 stack stores per k step); here
     * they stay in zmm0-15 and pass through memory once per call */
    int32_t sums[16 * 16] __attribute__((aligned(64)));
    const int64_t lda3 = 3 * lda;
    const uint8_t* a4 = a + 4 * lda;
    int64_t k = K4;
    __asm__ volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
        "vpxord %%zmm2, %%zmm2, %%zmm2\n\tvpxord %%zmm3, %%zmm3, %%zmm3\n\t"
        "vpxord %%zmm4, %%zmm4, %%zmm4\n\tvpxord %%zmm5, %%zmm5, %%zmm5\n\t"
        "vpxord %%zmm6, %%zmm6, %%zmm6\n\tvpxord %%zmm7, %%zmm7, %%zmm7\n\t"
        "vpxord %%zmm8, %%zmm8, %%zmm8\n\tvpxord %%zmm9, %%zmm9, %%zmm9\n\t"
        "vpxord %%zmm10, %%zmm10, %%zmm10\n\tvpxord %%zmm11, %%zmm11, %%zmm11\n\t"
        "vpxord %%zmm12, %%zmm12, %%zmm12\n\tvpxord %%zmm13, %%zmm13, %%zmm13\n\t"
        "vpxord %%zmm14, %%zmm14, %%zmm14\n\tvpxord %%zmm15, %%zmm15, %%zmm15\n\t"
        "test %[k], %[k]\n\t"
        "jz 2f\n\t"
        "1:\n\t"
        "vmovdqa64 (%[b]), %%zmm16\n\t"
        "vmovdqa64 64(%[b]), %%zmm17\n\t"
        "vpbroadcastd (%[a]), %%zmm18\n\t"
        "vpbroadcastd (%[a], %[lda], 1), %%zmm19\n\t"
        "vpdpbusd %%zmm16, %%zmm18, %%zmm0\n\t"
        "vpdpbusd %%zmm17, %%zmm18, %%zmm1\n\t"
        "vpbroadcastd (%[a], %[lda], 2), %%zmm18\n\t"
        "vpdpbusd %%zmm16, %%zmm19, %%zmm2\n\t"
        "vpdpbusd %%zmm17, %%zmm19, %%zmm3\n\t"
        "vpbroadcastd (%[a], %[lda3], 1), %%zmm19\n\t"
        "vpdpbusd %%zmm16, %%zmm18, %%zmm4\n\t"
        "vpdpbusd %%zmm17, %%zmm18, %%zmm5\n\t"
        "vpbroadcastd (%[a4]), %%zmm18\n\t"
        "vpdpbusd %%zmm16, %%zmm19, %%zmm6\n\t"
        "vpdpbusd %%zmm17, %%zmm19, %%zmm7\n\t"
        "vpbroadcastd (%[a4], %[lda], 1), %%zmm19\n\t"
        "vpdpbusd %%zmm16, %%zmm18, %%zmm8\n\t"
        "vpdpbusd %%zmm17, %%zmm18, %%zmm9\n\t"
        "vpbroadcastd (%[a4], %[lda], 2), %%zmm18\n\t"
        "vpdpbusd %%zmm16, %%zmm19, %%zmm10\n\t"
        "vpdpbusd %%zmm17, %%zmm19, %%zmm11\n\t"
        "vpbroadcastd (%[a4], %[lda3], 1), %%zmm19\n\t"
        "vpdpbusd %%zmm16, %%zmm18, %%zmm12\n\t"
        "vpdpbusd %%zmm17, %%zmm18, %%zmm13\n\t"
        "vpdpbusd %%zmm16, %%zmm19, %%zmm14\n\t"
        "vpdpbusd %%zmm17, %%zmm19, %%zmm15\n\t"
        "add $4, %[a]\n\t"
        "add $4, %[a4]\n\t"
        "add $128, %[b]\n\t"
        "dec %[k]\n\t"
        "jnz 1b\n\t"
        "2:\n\t"
        "vmovdqa64 %%zmm0, 0(%[s])\n\tvmovdqa64 %%zmm1, 64(%[s])\n\t"
        "vmovdqa64 %%zmm2, 128(%[s])\n\tvmovdqa64 %%zmm3, 192(%[s])\n\t"
        "vmovdqa64 %%zmm4, 256(%[s])\n\tvmovdqa64 %%zmm5, 320(%[s])\n\t"
        "vmovdqa64 %%zmm6, 384(%[s])\n\tvmovdqa64 %%zmm7, 448(%[s])\n\t"
        "vmovdqa64 %%zmm8, 512(%[s])\n\tvmovdqa64 %%zmm9, 576(%[s])\n\t"
        "vmovdqa64 %%zmm10, 640(%[s])\n\tvmovdqa64 %%zmm11, 704(%[s])\n\t"
        "vmovdqa64 %%zmm12, 768(%[s])\n\tvmovdqa64 %%zmm13, 832(%[s])\n\t"
        "vmovdqa64 %%zmm14, 896(%[s])\n\tvmovdqa64 %%zmm15, 960(%[s])\n\t"
        : [a] "+r"(a), [a4] "+r"(a4), [b] "+r"(bp), [k] "+r"(k)
        : [lda] "r"(lda), [lda3] "r"(lda3), [s] "r"(sums)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17",
          "xmm18", "xmm19");
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      acc0[i] = _mm512_load_si512((const void*)(sums + 32 * i));
      acc1[i] = _mm512_load_si512((const void*)(sums + 32 * i + 16));
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc0[i] = _mm512_setzero_si512();
      acc1[i] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < K4; ++k) {
      const __m512i b0 = _mm512_load_si512((const void*)(bp + k * 128));
      const __m512i b1 = HALF ? b0 : _mm512_load_si512((const void*)(bp + k * 128 + 64));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        memcpy(&four, a + i * lda + 4 * k, 4);
        const __m512i av = _mm512_set1_epi32(four);
        acc0[i] = _mm512_dpbusd_epi32(acc0[i], av, b0);
        if (!HALF) acc1[i] = _mm512_dpbusd_epi32(acc1[i], av, b1);
      }
    }
  }
  const __m512 ws0 = _mm512_maskz_loadu_ps(m0, w_scale), ws1 = _mm512_maskz_loadu_ps(m1, w_scale + 16);
  const __m512i sum0 = _mm512_cvtps_epi32(_mm512_maskz_loadu_ps(m0, w_sum));
  const __m512i sum1 = _mm512_cvtps_epi32(_mm512_maskz_loadu_ps(m1, w_sum + 16));
  const __m512 bi0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bi1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512i z = _mm512_set1_epi32(a_zp[i]);
    const __m512 as = _mm512_set1_ps(a_scale[i]);
    const float* r = res ? res + i * ldr : NULL;
    const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc0[i], _mm512_mullo_epi32(z, sum0))),
                                    _mm512_mul_ps(ws0, as));
    _mm512_mask_storeu_ps(c + i * ldc, m0, v_epi(v0, bi0, r, m0, epi));
    if (!HALF && m1) {
      const __m512 v1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_sub_epi32(acc1[i], _mm512_mullo_epi32(z, sum1))), _mm512_mul_ps(ws1, as));
      _mm512_mask_storeu_ps(c + i * ldc + 16, m1, v_epi(v1, bi1, r ? r + 16 : r, m1, epi));
    }
  }
}

/* One instantiation per (rows, half panel). */
AK_VNNI void ak_ukr_i8_vnni(int mr, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* bp,
                            float* c, int64_t ldc, int nv, const float* a_scale,
                            const int32_t* a_zp, const float* w_scale, const float* w_sum,
                            const float* bias, const float* res, int64_t ldr,
                            const ak_epilogue* epi) {
  const int half = nv <= 16;
#define AK_CASE(n, h)                                                                         \
  case n: ukr_i8_body(n, h, K4, a, lda, bp, c, ldc, nv, a_scale, a_zp, w_scale, w_sum, bias,  \
                      res, ldr, epi); break;
#define AK_SWITCH(h)                                                                          \
  switch (mr) {                                                                               \
    AK_CASE(8, h) AK_CASE(7, h) AK_CASE(6, h) AK_CASE(5, h) AK_CASE(4, h) AK_CASE(3, h)       \
    AK_CASE(2, h) AK_CASE(1, h) default: break;                                               \
  }
  if (half) { AK_SWITCH(1) }
  else { AK_SWITCH(0) }
#undef AK_SWITCH
#undef AK_CASE
}
#undef AK_VNNI

/* ---- 16-bit weights (bf16 / fp16), fp32 activations and sums ----------------------------- */

#define AK_W16 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,avx2,fma")))

AK_W16 AK_INLINE __m512 w16_load(const uint16_t* p, const int FMT) {
  const __m256i h = _mm256_load_si256((const __m256i*)p);
  if (FMT == AK_W16_FP16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AK_W16 AK_INLINE void ukr_w16_body(const int MR, const int FMT, int64_t K, const float* a,
                                   int64_t lda, const uint16_t* bp, float* c, int64_t ldc, int nv,
                                   const float* bias, const float* res, int64_t ldr,
                                   const ak_epilogue* epi) {
  const __mmask16 m0 = tail_mask(nv), m1 = nv > 16 ? tail_mask(nv - 16) : 0;
  __m512 acc0[AK_MR], acc1[AK_MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    /* the panel streams from memory (these layers are bound by reading it): ask for the line
     * 4 KB ahead, past what the hardware prefetcher keeps in flight */
    _mm_prefetch((const char*)(bp + (k + 64) * AK_NR), _MM_HINT_T0);
    const __m512 b0 = w16_load(bp + k * AK_NR, FMT), b1 = w16_load(bp + k * AK_NR + 16, FMT);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
    }
  }
  const __m512 bi0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bi1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const float* r = res ? res + i * ldr : NULL;
    _mm512_mask_storeu_ps(c + i * ldc, m0, v_epi(acc0[i], bi0, r, m0, epi));
    if (m1) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, v_epi(acc1[i], bi1, r ? r + 16 : r, m1, epi));
  }
}

AK_W16 void ak_ukr_w16_avx512(int mr, int64_t K, const float* a, int64_t lda, const uint16_t* bp,
                              int fmt, float* c, int64_t ldc, int nv, const float* bias,
                              const float* res, int64_t ldr, const ak_epilogue* epi) {
#define AK_CASE(n, f) case n: ukr_w16_body(n, f, K, a, lda, bp, c, ldc, nv, bias, res, ldr, epi); break;
#define AK_SWITCH(f)                                                                          \
  switch (mr) {                                                                               \
    AK_CASE(8, f) AK_CASE(7, f) AK_CASE(6, f) AK_CASE(5, f) AK_CASE(4, f) AK_CASE(3, f)       \
    AK_CASE(2, f) AK_CASE(1, f) default: break;                                               \
  }
  if (fmt == AK_W16_FP16) { AK_SWITCH(AK_W16_FP16) }
  else { AK_SWITCH(AK_W16_BF16) }
#undef AK_SWITCH
#undef AK_CASE
}
#undef AK_W16
