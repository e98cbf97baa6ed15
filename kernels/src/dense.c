/* Fused dense (GEMM + bias + activation), fp32. A portable blocked kernel; the compiler
 * builds AVX-512, AVX2 and baseline clones and the loader picks one for the running CPU.
 * ACCELKIT_PORTABLE_KERNELS=1 is honoured by the caller (glue) to force the baseline clone. */
#include <string.h>
#include "ak_kernels.h"

#define AK_BLOCK_N 256
#define AK_BLOCK_K 128

#define AK_DENSE_BODY                                                                      \
  for (int64_t i = 0; i < M; ++i) {                                                      \
    float* o = out + i * N;                                                              \
    if (bias) memcpy(o, bias, sizeof(float) * (size_t)N);                                \
    else memset(o, 0, sizeof(float) * (size_t)N);                                        \
  }                                                                                      \
  for (int64_t j0 = 0; j0 < N; j0 += AK_BLOCK_N) {                                       \
    const int64_t j1 = j0 + AK_BLOCK_N < N ? j0 + AK_BLOCK_N : N;                        \
    for (int64_t k0 = 0; k0 < K; k0 += AK_BLOCK_K) {                                     \
      const int64_t k1 = k0 + AK_BLOCK_K < K ? k0 + AK_BLOCK_K : K;                      \
      for (int64_t i = 0; i < M; ++i) {                                                  \
        float* restrict o = out + i * N;                                                 \
        const float* restrict xi = x + i * K;                                            \
        for (int64_t k = k0; k < k1; ++k) {                                              \
          const float xv = xi[k];                                                        \
          const float* restrict wk = w + k * N;                                          \
          for (int64_t j = j0; j < j1; ++j) o[j] += xv * wk[j];                          \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
  }                                                                                      \
  if (act == AK_ACT_RELU)                                                                \
    for (int64_t t = 0; t < M * N; ++t) out[t] = out[t] > 0.f ? out[t] : 0.f;

__attribute__((target_clones("avx512f", "avx2", "default")))
static void ak_dense_f32_dispatch(const float* restrict x, const float* restrict w,
                                  const float* restrict bias, float* restrict out, int64_t M,
                                  int64_t N, int64_t K, ak_activation act) {
  AK_DENSE_BODY
}

static void ak_dense_f32_portable(const float* restrict x, const float* restrict w,
                                  const float* restrict bias, float* restrict out, int64_t M,
                                  int64_t N, int64_t K, ak_activation act) {
  AK_DENSE_BODY
}

int ak_force_portable = 0;

void ak_dense_f32(const float* x, const float* w, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, ak_activation act) {
  if (ak_force_portable) ak_dense_f32_portable(x, w, bias, out, M, N, K, act);
  else ak_dense_f32_dispatch(x, w, bias, out, M, N, K, act);
}
