/* Portable (baseline x86-64 / any CPU) micro-kernel, epilogues and row kernels. Plain C that
 * the compiler may auto-vectorise for the baseline ISA; the AVX-512 set is in avx512.c. */
#include <math.h>
#include <string.h>
#include "ak_kernels.h"

static inline float act1(float v, const ak_epilogue* e) {
  switch (e->act) {
    case AK_ACT_RELU: return v > 0.f ? v : 0.f;
    case AK_ACT_CLIP: return v < e->lo ? e->lo : (v > e->hi ? e->hi : v);
    case AK_ACT_GELU_ERF: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case AK_ACT_GELU_TANH:
      return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case AK_ACT_SILU: return v / (1.f + expf(-v));
    case AK_ACT_SIGMOID: return 1.f / (1.f + expf(-v));
    case AK_ACT_QUICK_GELU: return v / (1.f + expf(-1.702f * v));
    default: return v;
  }
}

static inline float epi1(float v, float bias, const float* res, int64_t j, const ak_epilogue* e) {
  v = v * e->scale + bias;
  if (e->res_mode == AK_RES_PRE_ACT) v += res[j];
  v = act1(v, e);
  if (e->res_mode == AK_RES_POST_ACT) v += res[j];
  else if (e->res_mode == AK_RES_MUL) v *= res[j];
  return v;
}

static void ukr_portable(int mr, int64_t K, const float* a, int64_t lda, const float* bp,
                         float* c, int64_t ldc, int nv, const float* bias_col,
                         const float* bias_row, const float* res, int64_t ldr,
                         const ak_epilogue* epi) {
  float acc[AK_MR][AK_NR];
  memset(acc, 0, sizeof(acc));
  if (epi->accumulate)
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < nv; ++j) acc[i][j] = c[i * ldc + j];
  for (int64_t k = 0; k < K; ++k) {
    const float* b = bp + k * AK_NR;
    for (int i = 0; i < mr; ++i) {
      const float av = lda ? a[i * lda + k] : a[k * AK_MR + i];
      for (int j = 0; j < AK_NR; ++j) acc[i][j] += av * b[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    const float* r = res ? res + i * ldr : NULL;
    for (int j = 0; j < nv; ++j) {
      if (epi->raw) {
        c[i * ldc + j] = acc[i][j];
        continue;
      }
      const float bias = bias_col ? bias_col[j] : (bias_row ? bias_row[i] : 0.f);
      c[i * ldc + j] = epi1(acc[i][j], bias, r, j, epi);
    }
  }
}

static void row_epi_portable(float* dst, const float* src, int64_t n, float bias,
                             const float* res, const ak_epilogue* epi) {
  for (int64_t j = 0; j < n; ++j) dst[j] = epi1(src[j], bias, res, j, epi);
}

static void layer_norm_row_portable(const float* x, const float* gamma, const float* beta,
                                    float* out, int64_t D, float eps) {
  double s = 0., s2 = 0.;
  for (int64_t j = 0; j < D; ++j) s += x[j];
  const double mean = s / (double)D;
  for (int64_t j = 0; j < D; ++j) {
    const double d = x[j] - mean;
    s2 += d * d;
  }
  const float inv = (float)(1.0 / sqrt(s2 / (double)D + eps));
  for (int64_t j = 0; j < D; ++j)
    out[j] = ((x[j] - (float)mean) * inv) * (gamma ? gamma[j] : 1.f) + (beta ? beta[j] : 0.f);
}

static void rms_norm_row_portable(const float* x, const float* gamma, const float* beta,
                                  float* out, int64_t D, float eps) {
  (void)beta;
  double s2 = 0.;
  for (int64_t j = 0; j < D; ++j) s2 += (double)x[j] * x[j];
  const float inv = (float)(1.0 / sqrt(s2 / (double)D + eps));
  for (int64_t j = 0; j < D; ++j) out[j] = (x[j] * inv) * (gamma ? gamma[j] : 1.f);
}

static void softmax_row_portable(const float* x, const float* gamma, const float* beta,
                                 float* out, int64_t D, float eps) {
  (void)gamma; (void)beta; (void)eps;
  float mx = -INFINITY;
  for (int64_t j = 0; j < D; ++j) mx = x[j] > mx ? x[j] : mx;
  double s = 0.;
  for (int64_t j = 0; j < D; ++j) {
    out[j] = expf(x[j] - mx);
    s += out[j];
  }
  const float inv = (float)(1.0 / s);
  for (int64_t j = 0; j < D; ++j) out[j] *= inv;
}

void ak_dw_nhwc_row_portable(const float* x, const float* w, const ak_conv_geom* g,
                             int64_t channels, int64_t oy, const float* bias, const float* res,
                             float* out, const ak_epilogue* epi) {
  const int64_t C = channels;
  for (int64_t ox = 0; ox < g->OW; ++ox) {
    float* o = out + ox * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.f;
    for (int64_t ky = 0; ky < g->KH; ++ky) {
      const int64_t iy = oy * g->SH - g->PH + ky * g->DH;
      if (iy < 0 || iy >= g->H) continue;
      for (int64_t kx = 0; kx < g->KW; ++kx) {
        const int64_t ix = ox * g->SW - g->PW + kx * g->DW;
        if (ix < 0 || ix >= g->W) continue;
        const float* src = x + (iy * g->W + ix) * C;
        const float* wt = w + (ky * g->KW + kx) * C;
        for (int64_t c = 0; c < C; ++c) o[c] += src[c] * wt[c];
      }
    }
    const float* r = res ? res + ox * C : NULL;
    for (int64_t c = 0; c < C; ++c) o[c] = epi1(o[c], bias ? bias[c] : 0.f, r, c, epi);
  }
}

/* Winograd F(4x4, 3x3) transforms, one channel at a time (the AVX-512 twins do 16). */
static void wino_bt6_1(const float d[6], float r[6]) {
  r[0] = 4.f * d[0] - 5.f * d[2] + d[4];
  r[1] = (d[3] + d[4]) - 4.f * (d[1] + d[2]);
  r[2] = (d[4] - d[3]) + 4.f * (d[1] - d[2]);
  r[3] = (d[4] - d[2]) + 2.f * (d[3] - d[1]);
  r[4] = (d[4] - d[2]) - 2.f * (d[3] - d[1]);
  r[5] = 4.f * d[1] - 5.f * d[3] + d[5];
}

static void wino_at6_1(const float m[6], float o[4]) {
  const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = m[0] + s12 + s34;
  o[1] = d12 + 2.f * d34;
  o[2] = s12 + 4.f * s34;
  o[3] = d12 + 8.f * d34 + m[5];
}

void ak_wino_in_portable(const float* x, int64_t H, int64_t W, int64_t C, int64_t iy0,
                         int64_t ix0, float* v, int64_t vstride) {
  for (int64_t c = 0; c < C; ++c) {
    float t[6][6];
    for (int j = 0; j < 6; ++j) {
      float d[6], r[6];
      const int64_t ix = ix0 + j;
      for (int i = 0; i < 6; ++i) {
        const int64_t iy = iy0 + i;
        d[i] = iy >= 0 && iy < H && ix >= 0 && ix < W ? x[(iy * W + ix) * C + c] : 0.f;
      }
      wino_bt6_1(d, r);
      for (int i = 0; i < 6; ++i) t[i][j] = r[i];
    }
    for (int i = 0; i < 6; ++i) {
      float r[6];
      wino_bt6_1(t[i], r);
      for (int j = 0; j < 6; ++j) v[(i * 6 + j) * vstride + c] = r[j];
    }
  }
}

void ak_wino_out_portable(const float* mt, int64_t mstride, int64_t nc, float* out,
                          const float* res, int64_t OH, int64_t OW, int64_t ldo, int64_t oy0,
                          int64_t ox0, const float* bias, const ak_epilogue* epi) {
  const int64_t ny = OH - oy0 < 4 ? OH - oy0 : 4, nx = OW - ox0 < 4 ? OW - ox0 : 4;
  for (int64_t c = 0; c < nc; ++c) {
    float s[4][6];
    for (int j = 0; j < 6; ++j) {
      float m[6], o[4];
      for (int i = 0; i < 6; ++i) m[i] = mt[(i * 6 + j) * mstride + c];
      wino_at6_1(m, o);
      for (int i = 0; i < 4; ++i) s[i][j] = o[i];
    }
    for (int64_t i = 0; i < ny; ++i) {
      float y[4];
      wino_at6_1(s[i], y);
      for (int64_t j = 0; j < nx; ++j) {
        const int64_t at = ((oy0 + i) * OW + ox0 + j) * ldo;
        out[at + c] = epi1(y[j], bias ? bias[c] : 0.f, res ? res + at : NULL, c, epi);
      }
    }
  }
}

const ak_isa_table ak_portable_table = {ukr_portable, ak_im2col_portable, NULL, row_epi_portable, layer_norm_row_portable,
                                        softmax_row_portable, ak_dw_nhwc_row_portable,
                                        ak_wino_in_portable, ak_wino_out_portable, AK_MR, 0, NULL, NULL,
                                        rms_norm_row_portable};
