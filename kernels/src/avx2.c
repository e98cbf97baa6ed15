/* AVX2 + FMA kernels (8 floats per ymm register, 16 registers): the micro-kernel, vector
 * epilogues, row kernels, the NHWC depthwise row and the Winograd transforms, for the x86-64
 * CPUs without AVX-512 (AMD Zen 1-3, Intel before Skylake-SP and most client cores). Only called
 * after ak_isa() checked the CPU; the whole file is compiled for AVX2 and FMA. */
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#include <math.h>
#include "ak_kernels.h"

#define AK_INLINE static inline __attribute__((always_inline))

static const int32_t k_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* A vector's valid lanes: [0, left) of 8. Whole vectors take plain loads and stores: AMD's
 * VMASKMOVPS store is microcoded (about 1 per 12 cycles on Zen 2/3), so only tails use it. */
typedef struct {
  __m256i m;
  int full;
} ak_m8;

AK_INLINE ak_m8 tail8(int64_t left) {
  left = left < 0 ? 0 : (left > 8 ? 8 : left);
  ak_m8 r = {_mm256_loadu_si256((const __m256i*)(k_mask_table + 8 - left)), left == 8};
  return r;
}

AK_INLINE __m256 load8(const float* p, ak_m8 m) {
  return m.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.m);
}
AK_INLINE void store8(float* p, ak_m8 m, __m256 v) {
  if (m.full) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, m.m, v);
}

/* exp(x), |rel err| < 2e-7 on [-87, 88]: 2^n * p(r), r = x - n ln2, degree-7 Taylor; 2^n built
 * in the exponent field (n in [-126, 127] after the clamp). */
AK_INLINE __m256 v_exp(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.3365447505531f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AK_INLINE __m256 v_sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, v_exp(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* erf(x) via erfc(|x|) = t exp(-z^2 + P(t)), t = 1/(1 + z/2) (Numerical Recipes erfcc,
 * fractional error < 1.2e-7). */
AK_INLINE __m256 v_erf(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 z = _mm256_andnot_ps(sign, x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f),
                                 _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(0.17087277f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.82215223f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.48851587f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.13520398f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.27886807f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.18628806f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.09678418f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.37409196f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.00002368f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.26551223f));
  p = _mm256_fnmadd_ps(z, z, p);
  const __m256 e = _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_mul_ps(t, v_exp(p)));
  return _mm256_or_ps(e, _mm256_and_ps(sign, x)); /* erf is odd */
}

AK_INLINE __m256 v_act(__m256 v, const ak_epilogue* e) {
  switch (e->act) {
    case AK_ACT_RELU: return _mm256_max_ps(v, _mm256_setzero_ps());
    case AK_ACT_CLIP:
      return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(e->lo)), _mm256_set1_ps(e->hi));
    case AK_ACT_GELU_ERF: {
      const __m256 h = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
      return _mm256_fmadd_ps(h, v_erf(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f))), h);
    }
    case AK_ACT_GELU_TANH: { /* 0.5x(1 + tanh(u)) = x * sigmoid(2u) */
      const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      const __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(v3, _mm256_set1_ps(0.044715f), v),
                                     _mm256_set1_ps(2.f * 0.7978845608028654f));
      return _mm256_mul_ps(v, v_sigmoid(u));
    }
    case AK_ACT_SILU: return _mm256_mul_ps(v, v_sigmoid(v));
    case AK_ACT_SIGMOID: return v_sigmoid(v);
    case AK_ACT_QUICK_GELU: return _mm256_mul_ps(v, v_sigmoid(_mm256_mul_ps(v, _mm256_set1_ps(1.702f))));
    default: return v;
  }
}

AK_INLINE __m256 v_epi(__m256 v, __m256 bias, const float* res, ak_m8 m, const ak_epilogue* e) {
  v = _mm256_fmadd_ps(v, _mm256_set1_ps(e->scale), bias);
  if (e->res_mode == AK_RES_PRE_ACT) v = _mm256_add_ps(v, load8(res, m));
  v = v_act(v, e);
  if (e->res_mode == AK_RES_POST_ACT) v = _mm256_add_ps(v, load8(res, m));
  else if (e->res_mode == AK_RES_MUL) v = _mm256_mul_ps(v, load8(res, m));
  return v;
}

/* The epilogue of a vector of outputs: the common conv case (bias, then none/relu/clip, no
 * residual) branch-free, the rest through v_epi. */
typedef struct {
  __m256 lo, hi, scale;
  int simple;
} ak_epi8;

AK_INLINE ak_epi8 epi8_setup(const ak_epilogue* e) {
  ak_epi8 r;
  r.simple = e->act <= AK_ACT_CLIP && e->res_mode == AK_RES_NONE;
  r.lo = _mm256_set1_ps(e->act == AK_ACT_RELU ? 0.f : e->act == AK_ACT_CLIP ? e->lo : -INFINITY);
  r.hi = _mm256_set1_ps(e->act == AK_ACT_CLIP ? e->hi : INFINITY);
  r.scale = _mm256_set1_ps(e->scale);
  return r;
}

AK_INLINE __m256 epi8_apply(const ak_epi8* s, __m256 v, __m256 bias, const float* res, ak_m8 m,
                            const ak_epilogue* e) {
  if (s->simple)
    return _mm256_min_ps(s->hi, _mm256_max_ps(s->lo, _mm256_fmadd_ps(v, s->scale, bias)));
  return v_epi(v, bias, res, m, e);
}

/* R rows (<= 6) x V vectors of 8 columns (V <= 2: one 16-column half of the NR = 32 panel) in
 * R*V ymm accumulators: per k, V panel loads, R broadcasts and R*V FMAs. 6 x 16 keeps 12
 * independent accumulators (the FMA latency on two pipes) + 2 panel vectors + 1 broadcast in the
 * 16 registers; a whole 3 x 32 panel would need 17 and spills an accumulator every k. */
AK_INLINE void ukr_part(const int R, const int V, const int APACK, int64_t K, const float* a,
                        int64_t lda, const float* bp, float* c, int64_t ldc, int nv,
                        const float* bias_col, const float* bias_row, const float* res,
                        int64_t ldr, const ak_epilogue* epi) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v)
      acc[i][v] = epi->accumulate ? load8(c + i * ldc + 8 * v, tail8(nv - 8 * v)) : _mm256_setzero_ps();
  const float* ar[6];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) ar[i] = a + i * lda;
  if (R == 6 && V == 2 && K > 0) {
    /* the full 6 x 16 part in assembly: gcc's allocator spills one of the 12 accumulators to
     * the stack here (a store and a reload on every k) although 15 registers suffice */
    const float* a0 = a;
    const float* a3 = APACK ? a + 3 : a + 3 * lda;
    const int64_t rs = (APACK ? 1 : lda) * (int64_t)sizeof(float); /* next row */
    const int64_t ks = (APACK ? AK_MR : 1) * (int64_t)sizeof(float); /* next k */
    const float* b = bp;
    int64_t k = K;
    float* accp = (float*)acc; /* the accumulators travel through memory once per call */
    __asm__ volatile(
        "vmovups 0(%[acc]), %%ymm0\n\t"
        "vmovups 32(%[acc]), %%ymm1\n\t"
        "vmovups 64(%[acc]), %%ymm2\n\t"
        "vmovups 96(%[acc]), %%ymm3\n\t"
        "vmovups 128(%[acc]), %%ymm4\n\t"
        "vmovups 160(%[acc]), %%ymm5\n\t"
        "vmovups 192(%[acc]), %%ymm6\n\t"
        "vmovups 224(%[acc]), %%ymm7\n\t"
        "vmovups 256(%[acc]), %%ymm8\n\t"
        "vmovups 288(%[acc]), %%ymm9\n\t"
        "vmovups 320(%[acc]), %%ymm10\n\t"
        "vmovups 352(%[acc]), %%ymm11\n\t"
        "1:\n\t"
        "vmovaps (%[b]), %%ymm12\n\t"
        "vmovaps 32(%[b]), %%ymm13\n\t"
        "vbroadcastss (%[a0]), %%ymm14\n\t"
        "vbroadcastss (%[a0],%[rs],1), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm14, %%ymm0\n\t"
        "vfmadd231ps %%ymm13, %%ymm14, %%ymm1\n\t"
        "vbroadcastss (%[a0],%[rs],2), %%ymm14\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %%ymm2\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %%ymm3\n\t"
        "vbroadcastss (%[a3]), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm14, %%ymm4\n\t"
        "vfmadd231ps %%ymm13, %%ymm14, %%ymm5\n\t"
        "vbroadcastss (%[a0],%[rs],4), %%ymm14\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %%ymm6\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %%ymm7\n\t"
        "vbroadcastss (%[a3],%[rs],2), %%ymm15\n\t"
        "vfmadd231ps %%ymm12, %%ymm14, %%ymm8\n\t"
        "vfmadd231ps %%ymm13, %%ymm14, %%ymm9\n\t"
        "vfmadd231ps %%ymm12, %%ymm15, %%ymm10\n\t"
        "vfmadd231ps %%ymm13, %%ymm15, %%ymm11\n\t"
        "add %[ks], %[a0]\n\t"
        "add %[ks], %[a3]\n\t"
        "add $128, %[b]\n\t"
        "dec %[k]\n\t"
        "jnz 1b\n\t"
        "vmovups %%ymm0, 0(%[acc])\n\t"
        "vmovups %%ymm1, 32(%[acc])\n\t"
        "vmovups %%ymm2, 64(%[acc])\n\t"
        "vmovups %%ymm3, 96(%[acc])\n\t"
        "vmovups %%ymm4, 128(%[acc])\n\t"
        "vmovups %%ymm5, 160(%[acc])\n\t"
        "vmovups %%ymm6, 192(%[acc])\n\t"
        "vmovups %%ymm7, 224(%[acc])\n\t"
        "vmovups %%ymm8, 256(%[acc])\n\t"
        "vmovups %%ymm9, 288(%[acc])\n\t"
        "vmovups %%ymm10, 320(%[acc])\n\t"
        "vmovups %%ymm11, 352(%[acc])\n\t"
        : [a0] "+r"(a0), [a3] "+r"(a3), [b] "+r"(b), [k] "+r"(k)
        : [acc] "r"(accp), [rs] "r"(rs), [ks] "r"(ks)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
    K = 0; /* done: skip the loop below */
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[2];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) b[v] = _mm256_load_ps(bp + k * AK_NR + 8 * v);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_broadcast_ss(APACK ? a + k * AK_MR + i : ar[i] + k);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(av, b[v], acc[i][v]);
    }
  }
  /* the masks only now: live across the loop they would take the registers it needs */
  __asm__ volatile("" ::: "memory");
  ak_m8 m[2];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) m[v] = tail8(nv - 8 * v);
  if (epi->raw) { /* a partial sum over a K block: the next block adds to it */
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) store8(c + i * ldc + 8 * v, m[v], acc[i][v]);
    return;
  }
  __m256 bc[2];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) bc[v] = bias_col ? load8(bias_col + 8 * v, m[v]) : _mm256_setzero_ps();
  /* the common conv epilogues are branch-free per vector (a short K leaves the epilogue a large
   * share of the call) */
  const ak_epi8 e8 = epi8_setup(epi);
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    const float* r = res ? res + i * ldr : NULL;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __m256 bias = bias_row ? _mm256_set1_ps(bias_row[i]) : bc[v];
      store8(c + i * ldc + 8 * v, m[v],
             epi8_apply(&e8, acc[i][v], bias, r ? r + 8 * v : NULL, m[v], epi));
    }
  }
}

/* mr rows (up to 24 with a row-major A, AK_MR with a packed one) x NR columns: two 16-column
 * halves, each in row parts of at most 6 (the drivers split a block's rows into equal calls of
 * up to 24, so parts of 1-3 rows, with too few accumulators to hide the FMA latency, are rare). */
static void ukr_avx2(int mr, int64_t K, const float* a, int64_t lda, const float* bp, float* c,
                     int64_t ldc, int nv, const float* bias_col, const float* bias_row,
                     const float* res, int64_t ldr, const ak_epilogue* epi) {
  const int apack = lda == 0;
  for (int h = 0; h < 2; ++h) {
    const int nvh = nv - 16 * h > 16 ? 16 : nv - 16 * h;
    if (nvh <= 0) break;
    const int vecs = (nvh + 7) / 8;
    /* parts of at most 6 rows, as equal as possible (8 rows: 4 + 4, not 6 + 2) */
    const int parts = (mr + 5) / 6, base = parts ? mr / parts : 0, extra = parts ? mr % parts : 0;
    for (int part = 0, r0 = 0; part < parts; ++part) {
      const int rows = base + (part < extra);
      const float* ap = apack ? a + r0 : a + r0 * lda;
      const float* bph = bp + 16 * h;
      float* cp = c + r0 * ldc + 16 * h;
      const float* bcol = bias_col ? bias_col + 16 * h : NULL;
      const float* brow = bias_row ? bias_row + r0 : NULL;
      const float* rp = res ? res + r0 * ldr + 16 * h : NULL;
#define AK_PART(n, v, p) \
  ukr_part(n, v, p, K, ap, lda, bph, cp, ldc, nvh, bcol, brow, rp, ldr, epi)
#define AK_ROWS(v, p)                                                                   \
  switch (rows) {                                                                       \
    case 6: AK_PART(6, v, p); break;                                                    \
    case 5: AK_PART(5, v, p); break;                                                    \
    case 4: AK_PART(4, v, p); break;                                                    \
    case 3: AK_PART(3, v, p); break;                                                    \
    case 2: AK_PART(2, v, p); break;                                                    \
    default: AK_PART(1, v, p); break;                                                   \
  }
      if (apack && vecs == 1) { AK_ROWS(1, 1) }
      else if (apack) { AK_ROWS(2, 1) }
      else if (vecs == 1) { AK_ROWS(1, 0) }
      else { AK_ROWS(2, 0) }
#undef AK_ROWS
#undef AK_PART
      r0 += rows;
    }
  }
}

static void row_epi_avx2(float* dst, const float* src, int64_t n, float bias, const float* res,
                         const ak_epilogue* epi) {
  const __m256 b = _mm256_set1_ps(bias);
  for (int64_t j = 0; j < n; j += 8) {
    const ak_m8 m = tail8(n - j);
    store8(dst + j, m, v_epi(load8(src + j, m), b, res ? res + j : NULL, m, epi));
  }
}

AK_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AK_INLINE float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static void layer_norm_row_avx2(const float* x, const float* gamma, const float* beta, float* out,
                                int64_t D, float eps) {
  __m256 s = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) s = _mm256_add_ps(s, load8(x + j, tail8(D - j)));
  const float mean = hsum8(s) / (float)D;
  const __m256 mv = _mm256_set1_ps(mean);
  __m256 s2 = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(load8(x + j, m), mv), _mm256_castsi256_ps(m.m));
    s2 = _mm256_fmadd_ps(d, d, s2);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum8(s2) / (float)D + eps));
  for (int64_t j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(load8(x + j, m), mv), inv);
    if (gamma) v = _mm256_mul_ps(v, load8(gamma + j, m));
    if (beta) v = _mm256_add_ps(v, load8(beta + j, m));
    store8(out + j, m, v);
  }
}

static void rms_norm_row_avx2(const float* x, const float* gamma, const float* beta, float* out,
                              int64_t D, float eps) {
  (void)beta;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();  /* two chains: FMA latency */
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; j < D; j += 8) {
    const __m256 a = load8(x + j, tail8(D - j));
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum8(_mm256_add_ps(s0, s1)) / (float)D + eps));
  for (j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    __m256 v = _mm256_mul_ps(load8(x + j, m), inv);
    if (gamma) v = _mm256_mul_ps(v, load8(gamma + j, m));
    store8(out + j, m, v);
  }
}

static void softmax_row_avx2(const float* x, const float* gamma, const float* beta, float* out,
                             int64_t D, float eps) {
  (void)gamma; (void)beta; (void)eps;
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 mx = ninf;
  for (int64_t j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, load8(x + j, m), _mm256_castsi256_ps(m.m)));
  }
  const __m256 mv = _mm256_set1_ps(hmax8(mx));
  __m256 s = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    const __m256 e = _mm256_and_ps(v_exp(_mm256_sub_ps(load8(x + j, m), mv)), _mm256_castsi256_ps(m.m));
    s = _mm256_add_ps(s, e);
    store8(out + j, m, e);
  }
  const __m256 inv = _mm256_set1_ps(1.f / hsum8(s));
  for (int64_t j = 0; j < D; j += 8) {
    const ak_m8 m = tail8(D - j);
    store8(out + j, m, _mm256_mul_ps(load8(out + j, m), inv));
  }
}

/* NHWC depthwise: one output pixel, NV vectors of 8 channels from c0 (the last one masked by
 * `last`), over the taps [ky0, ky1) x [kx0, kx1) inside the input; epilogue on the accumulators. */
AK_INLINE void dw_pixel(const int NV, const int FULL3, const int MASKED, ak_m8 last,
                        const float* xrow, const float* wrow, int64_t C, int64_t rowstep,
                        int64_t colstep, int64_t KW, int64_t ky0, int64_t ky1, int64_t kx0,
                        int64_t kx1, const float* bias, const float* res, float* out,
                        const ak_epi8* s, const ak_epilogue* epi) {
  /* only the last vector of a masked chunk takes the (slower) masked loads and store */
#define AK_LD(p, j) (MASKED && (j) == NV - 1 ? _mm256_maskload_ps((p), last.m) : _mm256_loadu_ps(p))
  __m256 acc[4];
  const ak_m8 full = tail8(8);
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  if (FULL3) {
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
      for (int j = 0; j < NV; ++j)
        acc[j] = _mm256_fmadd_ps(AK_LD(src + 8 * j, j), AK_LD(wt + 8 * j, j), acc[j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const ak_m8 m = MASKED && j == NV - 1 ? last : full;
    const __m256 b = bias ? AK_LD(bias + 8 * j, j) : _mm256_setzero_ps();
    store8(out + 8 * j, m, epi8_apply(s, acc[j], b, res ? res + 8 * j : NULL, m, epi));
  }
#undef AK_LD
}

/* Four adjacent output pixels of a 3-wide, undilated window at stride S (1 or 2), all taps of
 * each row inside the input: per 8 channels, the 3S + 3 input columns of a row are loaded once
 * and shared by the pixels whose windows overlap, the three weights once for all four. FULL:
 * whole vectors (plain loads), else the masked tail. */
AK_INLINE void dw_quad_chunk_s1(const int FULL, ak_m8 m, const float* xrow, const float* w,
                                int64_t C, int64_t rowstep, int64_t ky0, int64_t ky1,
                                const float* bias, const float* res, float* out,
                                const ak_epi8* s, const ak_epilogue* epi) {
#define AK_LD(p) (FULL ? _mm256_loadu_ps(p) : _mm256_maskload_ps((p), m.m))
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* xr = xrow + ky * rowstep;
    const float* wr = w + ky * 3 * C;
    const __m256 w0 = AK_LD(wr), w1 = AK_LD(wr + C), w2 = AK_LD(wr + 2 * C);
    const __m256 x0 = AK_LD(xr), x1 = AK_LD(xr + C), x2 = AK_LD(xr + 2 * C);
    const __m256 x3 = AK_LD(xr + 3 * C), x4 = AK_LD(xr + 4 * C), x5 = AK_LD(xr + 5 * C);
    a0 = _mm256_fmadd_ps(x0, w0, a0);
    a1 = _mm256_fmadd_ps(x1, w0, a1);
    a2 = _mm256_fmadd_ps(x2, w0, a2);
    a3 = _mm256_fmadd_ps(x3, w0, a3);
    a0 = _mm256_fmadd_ps(x1, w1, a0);
    a1 = _mm256_fmadd_ps(x2, w1, a1);
    a2 = _mm256_fmadd_ps(x3, w1, a2);
    a3 = _mm256_fmadd_ps(x4, w1, a3);
    a0 = _mm256_fmadd_ps(x2, w2, a0);
    a1 = _mm256_fmadd_ps(x3, w2, a1);
    a2 = _mm256_fmadd_ps(x4, w2, a2);
    a3 = _mm256_fmadd_ps(x5, w2, a3);
  }
  const __m256 b = bias ? AK_LD(bias) : _mm256_setzero_ps();
#undef AK_LD
  const __m256 acc[4] = {a0, a1, a2, a3};
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)
    store8(out + p * C, m, epi8_apply(s, acc[p], b, res ? res + p * C : NULL, m, epi));
}

/* The same at stride 2: nine input columns per row for the four windows (written generally in
 * S: the explicit stride-1 form above measured 1.3-2x faster than this one at S = 1). */
AK_INLINE void dw_quad_chunk(const int S, const int FULL, ak_m8 m, const float* xrow,
                             const float* w, int64_t C, int64_t rowstep, int64_t ky0,
                             int64_t ky1, const float* bias, const float* res, float* out,
                             const ak_epi8* s, const ak_epilogue* epi) {
  if (S == 1) {
    dw_quad_chunk_s1(FULL, m, xrow, w, C, rowstep, ky0, ky1, bias, res, out, s, epi);
    return;
  }
#define AK_LD(p) (FULL ? _mm256_loadu_ps(p) : _mm256_maskload_ps((p), m.m))
  __m256 acc[4];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) acc[p] = _mm256_setzero_ps();
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* xr = xrow + ky * rowstep;
    const float* wr = w + ky * 3 * C;
    const __m256 w0 = AK_LD(wr), w1 = AK_LD(wr + C), w2 = AK_LD(wr + 2 * C);
    __m256 xv[9];
#pragma GCC unroll 9
    for (int q = 0; q < 3 * S + 3; ++q) xv[q] = AK_LD(xr + q * C);
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      acc[p] = _mm256_fmadd_ps(xv[S * p], w0, acc[p]);
      acc[p] = _mm256_fmadd_ps(xv[S * p + 1], w1, acc[p]);
      acc[p] = _mm256_fmadd_ps(xv[S * p + 2], w2, acc[p]);
    }
  }
  const __m256 b = bias ? AK_LD(bias) : _mm256_setzero_ps();
#undef AK_LD
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)
    store8(out + p * C, m, epi8_apply(s, acc[p], b, res ? res + p * C : NULL, m, epi));
}

AK_INLINE void dw_quad(const int S, const float* xrow, const float* w, int64_t C,
                       int64_t rowstep, int64_t ky0, int64_t ky1, const float* bias,
                       const float* res, float* out, const ak_epi8* s, const ak_epilogue* epi) {
  int64_t c0 = 0;
  for (; c0 + 8 <= C; c0 += 8)
    dw_quad_chunk(S, 1, tail8(8), xrow + c0, w + c0, C, rowstep, ky0, ky1,
                  bias ? bias + c0 : NULL, res ? res + c0 : NULL, out + c0, s, epi);
  if (c0 < C)
    dw_quad_chunk(S, 0, tail8(C - c0), xrow + c0, w + c0, C, rowstep, ky0, ky1,
                  bias ? bias + c0 : NULL, res ? res + c0 : NULL, out + c0, s, epi);
}

static void dw_nhwc_row_avx2(const float* x, const float* w, const ak_conv_geom* g,
                             int64_t channels, int64_t oy, const float* bias, const float* res,
                             float* out, const ak_epilogue* epi) {
  const int64_t C = channels, iy0 = oy * g->SH - g->PH;
  int64_t ky0 = 0, ky1 = g->KH; /* the taps whose input row exists */
  while (ky0 < ky1 && iy0 + ky0 * g->DH < 0) ++ky0;
  while (ky1 > ky0 && iy0 + (ky1 - 1) * g->DH >= g->H) --ky1;
  const int64_t rowstep = g->DH * g->W * C, colstep = g->DW * C;
  const int quads = g->KW == 3 && (g->SW == 1 || g->SW == 2) && g->DW == 1;
  const ak_epi8 e8 = epi8_setup(epi);
  for (int64_t ox = 0; ox < g->OW; ++ox) {
    const int64_t ix0 = ox * g->SW - g->PW;
    if (quads && ix0 >= 0 && ox + 3 < g->OW && ix0 + 3 * g->SW + 2 < g->W) {
      const float* xq = x + (iy0 * g->W + ix0) * C;
      if (g->SW == 1)
        dw_quad(1, xq, w, C, rowstep, ky0, ky1, bias, res ? res + ox * C : NULL, out + ox * C,
                &e8, epi);
      else
        dw_quad(2, xq, w, C, rowstep, ky0, ky1, bias, res ? res + ox * C : NULL, out + ox * C,
                &e8, epi);
      ox += 3;
      continue;
    }
    const int64_t kx0 = ix0 < 0 ? (-ix0 + g->DW - 1) / g->DW : 0;
    int64_t kx1 = ix0 > g->W - 1 ? 0 : (g->W - 1 - ix0) / g->DW + 1;
    if (kx1 > g->KW) kx1 = g->KW;
    const float* xrow = x + (iy0 * g->W + ix0) * C; /* tap (0, 0): only taps inside are read */
    float* o = out + ox * C;
    const float* r = res ? res + ox * C : NULL;
    const int full3 = g->KW == 3 && kx0 == 0 && kx1 == 3;
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const int64_t left = C - c0;
      const int nv = left >= 32 ? 4 : (int)((left + 7) / 8);
      const ak_m8 last = tail8(left - 8 * (nv - 1));
#define AK_DW(n, f3, mk)                                                                      \
  dw_pixel(n, f3, mk, last, xrow + c0, w + c0, C, rowstep, colstep, g->KW, ky0, ky1, kx0, kx1, \
           bias ? bias + c0 : NULL, r ? r + c0 : NULL, o + c0, &e8, epi)
      const int masked = (left & 7) != 0 && left < 32;
      switch (nv * 4 + full3 * 2 + masked) {
        case 19: AK_DW(4, 1, 1); break;
        case 18: AK_DW(4, 1, 0); break;
        case 17: AK_DW(4, 0, 1); break;
        case 16: AK_DW(4, 0, 0); break;
        case 15: AK_DW(3, 1, 1); break;
        case 14: AK_DW(3, 1, 0); break;
        case 13: AK_DW(3, 0, 1); break;
        case 12: AK_DW(3, 0, 0); break;
        case 11: AK_DW(2, 1, 1); break;
        case 10: AK_DW(2, 1, 0); break;
        case 9: AK_DW(2, 0, 1); break;
        case 8: AK_DW(2, 0, 0); break;
        case 7: AK_DW(1, 1, 1); break;
        case 6: AK_DW(1, 1, 0); break;
        case 5: AK_DW(1, 0, 1); break;
        default: AK_DW(1, 0, 0); break;
      }
#undef AK_DW
    }
  }
}

/* ---- Winograd F(4x4, 3x3) transforms (channels last: 8 channels per vector) ---------------- */

AK_INLINE void wino_bt6(const __m256 d0, const __m256 d1, const __m256 d2, const __m256 d3,
                        const __m256 d4, const __m256 d5, __m256 r[6]) {
  const __m256 four = _mm256_set1_ps(4.f), five = _mm256_set1_ps(5.f), two = _mm256_set1_ps(2.f);
  r[0] = _mm256_fmadd_ps(four, d0, _mm256_fnmadd_ps(five, d2, d4));
  r[1] = _mm256_fnmadd_ps(four, _mm256_add_ps(d1, d2), _mm256_add_ps(d3, d4));
  r[2] = _mm256_fmadd_ps(four, _mm256_sub_ps(d1, d2), _mm256_sub_ps(d4, d3));
  r[3] = _mm256_fmadd_ps(two, _mm256_sub_ps(d3, d1), _mm256_sub_ps(d4, d2));
  r[4] = _mm256_fnmadd_ps(two, _mm256_sub_ps(d3, d1), _mm256_sub_ps(d4, d2));
  r[5] = _mm256_fmadd_ps(four, d1, _mm256_fnmadd_ps(five, d3, d5));
}

AK_INLINE void wino_at6(const __m256 m0, const __m256 m1, const __m256 m2, const __m256 m3,
                        const __m256 m4, const __m256 m5, __m256 o[4]) {
  const __m256 s12 = _mm256_add_ps(m1, m2), d12 = _mm256_sub_ps(m1, m2);
  const __m256 s34 = _mm256_add_ps(m3, m4), d34 = _mm256_sub_ps(m3, m4);
  o[0] = _mm256_add_ps(_mm256_add_ps(m0, s12), s34);
  o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.f), d34, d12);
  o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.f), s34, s12);
  o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.f), d34, d12), m5);
}

static void wino_in_avx2(const float* x, int64_t H, int64_t W, int64_t C, int64_t iy0,
                         int64_t ix0, float* v, int64_t vstride) {
  int rows = 0, cols = 0; /* bit i: patch row / column i lies inside the input */
  for (int i = 0; i < 6; ++i) {
    if (iy0 + i >= 0 && iy0 + i < H) rows |= 1 << i;
    if (ix0 + i >= 0 && ix0 + i < W) cols |= 1 << i;
  }
  for (int64_t c0 = 0; c0 < C; c0 += 8) {
    const ak_m8 m = tail8(C - c0);
    __m256 t[6][6];
    for (int j = 0; j < 6; ++j) {
      __m256 d[6], r[6];
      const int col = (cols >> j) & 1;
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i)
        d[i] = col && ((rows >> i) & 1) ? load8(x + ((iy0 + i) * W + ix0 + j) * C + c0, m)
                                        : _mm256_setzero_ps();
      wino_bt6(d[0], d[1], d[2], d[3], d[4], d[5], r);
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) t[i][j] = r[i];
    }
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      __m256 r[6];
      wino_bt6(t[i][0], t[i][1], t[i][2], t[i][3], t[i][4], t[i][5], r);
#pragma GCC unroll 6
      for (int j = 0; j < 6; ++j) store8(v + (i * 6 + j) * vstride + c0, m, r[j]);
    }
  }
}

static void wino_out_avx2(const float* mt, int64_t mstride, int64_t nc, float* out,
                          const float* res, int64_t OH, int64_t OW, int64_t ldo, int64_t oy0,
                          int64_t ox0, const float* bias, const ak_epilogue* epi) {
  const int64_t ny = OH - oy0 < 4 ? OH - oy0 : 4, nx = OW - ox0 < 4 ? OW - ox0 : 4;
  for (int64_t c0 = 0; c0 < nc; c0 += 8) {
    const ak_m8 m = tail8(nc - c0);
    __m256 s[4][6];
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) {
      const float* p = mt + j * mstride + c0;
      __m256 o[4];
      wino_at6(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 6 * mstride),
               _mm256_loadu_ps(p + 12 * mstride), _mm256_loadu_ps(p + 18 * mstride),
               _mm256_loadu_ps(p + 24 * mstride), _mm256_loadu_ps(p + 30 * mstride), o);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) s[i][j] = o[i];
    }
    const __m256 b = bias ? load8(bias + c0, m) : _mm256_setzero_ps();
    for (int64_t i = 0; i < ny; ++i) {
      __m256 y[4];
      wino_at6(s[i][0], s[i][1], s[i][2], s[i][3], s[i][4], s[i][5], y);
      for (int64_t j = 0; j < nx; ++j) {
        const int64_t at = ((oy0 + i) * OW + ox0 + j) * ldo + c0;
        store8(out + at, m, v_epi(y[j], b, res ? res + at : NULL, m, epi));
      }
    }
  }
}

/* im2col (NCHW GEMM path) and the NCHW depthwise plane: the portable code (memory-bound) */
/* Attention's K^T panels by 8x8 in-register transposes (unpack, shuffle, 128-bit permute):
 * 8 keys x 8 columns per block; columns past the last multiple of 8 by scalar copies, keys past
 * the last one as zeros. */
static void pack_t_avx2(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  const int64_t c8 = cols & ~(int64_t)7;
  for (int64_t r0 = 0; r0 < rows; r0 += AK_NR) {
    float* d = dst + (r0 / AK_NR) * cols * AK_NR;
    const int64_t nv = rows - r0 < AK_NR ? rows - r0 : AK_NR;
    for (int64_t j0 = 0; j0 < AK_NR; j0 += 8) {
      for (int64_t c0 = 0; c0 < c8; c0 += 8) {
        __m256 r[8], t[8];
        for (int i = 0; i < 8; ++i)
          r[i] = j0 + i < nv ? _mm256_loadu_ps(src + (r0 + j0 + i) * lds + c0) : _mm256_setzero_ps();
        for (int i = 0; i < 8; i += 2) {
          t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
          t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
          r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
          r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
          r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
          r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(d + (c0 + i) * AK_NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
          _mm256_storeu_ps(d + (c0 + i + 4) * AK_NR + j0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
        }
      }
      for (int64_t c = c8; c < cols; ++c)
        for (int64_t j = j0; j < j0 + 8; ++j) d[c * AK_NR + j] = j < nv ? src[(r0 + j) * lds + c] : 0.f;
    }
  }
}

const ak_isa_table ak_avx2_table = {ukr_avx2, ak_im2col_portable, NULL, row_epi_avx2,
                                    layer_norm_row_avx2, softmax_row_avx2, dw_nhwc_row_avx2,
                                    wino_in_avx2, wino_out_avx2, 24, 0, pack_t_avx2, NULL,
                                    rms_norm_row_avx2};
