/* accelkit compute kernels: plain C, no TVM headers. Row-major, contiguous float32. */
#ifndef AK_KERNELS_H_
#define AK_KERNELS_H_
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef enum { AK_ACT_NONE = 0, AK_ACT_RELU = 1 } ak_activation;

/* out[M,N] = act(x[M,K] @ w[K,N] + bias[N]); bias may be NULL. */
void ak_dense_f32(const float* x, const float* w, const float* bias, float* out,
                  int64_t M, int64_t N, int64_t K, ak_activation act);

#ifdef __cplusplus
}
#endif
#endif
