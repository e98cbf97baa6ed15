/* accelkit compute kernels: plain C, no TVM headers. Row-major float32.
 *
 * One GEMM core serves dense, batched matmul and convolution: C = epilogue(scale * A @ B), where
 * B is consumed in panels of AK_NR columns (packed once at compile time for constant weights,
 * packed per call for activations and im2col). The epilogue (bias, residual, activation) runs on
 * the accumulators before the single store. Parallel loops go through one pool per process
 * (TVM's, see ak_set_parallel_launch), never a second one. */
#ifndef AK_KERNELS_H_
#define AK_KERNELS_H_
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define AK_NR 32 /* columns per packed B panel */
#define AK_MR 8  /* rows per micro-tile */

typedef enum {
  AK_ACT_NONE = 0,
  AK_ACT_RELU = 1,
  AK_ACT_CLIP = 2, /* min(max(x, lo), hi), e.g. relu6 */
  AK_ACT_GELU_ERF = 3,
  AK_ACT_GELU_TANH = 4,
  AK_ACT_SILU = 5,
  AK_ACT_SIGMOID = 6,
  AK_ACT_QUICK_GELU = 7, /* x * sigmoid(1.702 x): CLIP's */
  AK_ACT_COUNT_ = 8
} ak_activation;

typedef enum { AK_BIAS_NONE = 0, AK_BIAS_COL = 1, AK_BIAS_ROW = 2 } ak_bias_mode;
/* residual: added before or after the activation, or multiplied after it (MUL: a gated MLP's
 * act(x W_gate) * (x W_up), res being the other projection) */
typedef enum { AK_RES_NONE = 0, AK_RES_PRE_ACT = 1, AK_RES_POST_ACT = 2, AK_RES_MUL = 3 } ak_res_mode;

typedef struct {
  int act;          /* ak_activation */
  float lo, hi;     /* AK_ACT_CLIP bounds */
  float scale;      /* multiplies A @ B before the bias */
  int bias_mode;    /* ak_bias_mode: bias[n] or bias[m] */
  int res_mode;     /* ak_res_mode */
  /* K-blocked GEMM (driver-internal, 0 from callers): accumulate = C holds a partial sum to
   * add to; raw = store the partial sum, no epilogue (a later K block finishes it) */
  int accumulate, raw;
  /* driver-internal, NULL from callers: a micro-kernel call also prefetches (into L2) one 64-byte
   * line per k step from here on: the weight slice the thread uses next, so streaming weights
   * from memory overlaps this call's arithmetic */
  const char* pf;
  /* driver-internal, 0 from callers: K runs in nseg segments of K each (the kernel rows of a
   * small-channel conv read in place): segment s reads A from a + s * seg_lda and B from
   * bp + s * K * NR; only where the ISA table's `segments` says its ukr does */
  int nseg;
  int64_t seg_lda;
} ak_epilogue;

/* Convolution geometry (NCHW input of one image, OIHW weight). */
typedef struct {
  int64_t C, H, W;          /* input channels (per group), height, width */
  int64_t KH, KW, OH, OW;
  int64_t SH, SW, PH, PW, DH, DW;
} ak_conv_geom;

/* The output columns [*x0, *x1) whose kernel window lies inside the input in x (empty when
 * none does): the conv drivers' in-place and unrolled paths; the others handle the padding. */
static inline void ak_inside_cols(const ak_conv_geom* g, int64_t* x0, int64_t* x1) {
  const int64_t last = g->W - 1 - (g->KW - 1) * g->DW + g->PW; /* ox * SW <= last */
  *x0 = (g->PW + g->SW - 1) / g->SW;
  *x1 = last >= 0 ? last / g->SW + 1 : 0;
  if (*x1 > g->OW) *x1 = g->OW;
  if (*x1 < *x0) *x1 = *x0;
}

/* Tuning knobs of one kernel call; 0 everywhere = the built-in heuristics (what an untuned model
 * runs). `accelkit tune` measures alternatives per call site and bakes the best into the call.
 * The FFI layer passes them packed in one int64 `config` argument (see ak_tuning_unpack). */
typedef struct {
  int threads; /* pool threads to use: 0 = all; 1 = run on the calling thread */
  int grain;   /* GEMM: work items per thread (load balance vs reuse); 0 = 4 */
  int order;   /* GEMM: 0 = auto, 1 = stream B panels, 2 = B-resident when B is packed per call */
  int loop;    /* GEMM with packed weights: 0 = row chunks inner, 1 = weight panels inner */
  int kc;      /* GEMM: K block (a panel's slice stays in L1 across the row tiles); 0 = all K */
} ak_tuning;
#define AK_TUNE_MAX_GRAIN 64
#define AK_TUNE_MAX_KC_CODE 5 /* kc = 64 << (code - 1): 64 .. 1024 */
/* config = threads | grain << 8 | order << 16 | loop << 20 | kc code << 24 */
static inline ak_tuning ak_tuning_unpack(int64_t config) {
  const int kcode = (int)((config >> 24) & 0xf);
  ak_tuning t = {(int)(config & 0xff), (int)((config >> 8) & 0xff), (int)((config >> 16) & 0xf),
                 (int)((config >> 20) & 0xf), kcode ? 64 << (kcode - 1) : 0};
  return t;
}

typedef struct ak_gemm ak_gemm;
/* Fills dst[K][AK_NR] with columns [n0, n0 + AK_NR) of batch b's B (zeros past N). */
typedef void (*ak_pack_fn)(const ak_gemm* g, int64_t b, int64_t n0, float* dst);

struct ak_gemm {
  int64_t batch, M, N, K;
  const float* a; int64_t lda, a_bstride;           /* A[b][m][k] = a[b*a_bstride + m*lda + k] */
  int a_prepacked;                                  /* a is [batch][ceil(M/MR)][K][MR] */
  const float* b; int64_t ldb, b_bstride;           /* B[b][k][n] = b[b*b_bstride + k*ldb + n] */
  int b_prepacked;                                  /* b is [batch][ceil(N/NR)][K][NR] */
  ak_pack_fn pack;                                  /* NULL: plain row-major B (above) */
  const ak_conv_geom* conv;                         /* for the im2col packer */
  float* c; int64_t ldc, c_bstride;
  const float* bias; int64_t bias_bstride;
  const float* res; int64_t ldr, r_bstride;
  ak_epilogue epi;
  ak_tuning tune;
};

/* The byte size of the model the calling thread runs next (its library, weights included);
 * 0 = unknown. Dense layers split their rows between the threads when it fits in half the
 * last-level cache (see ak_gemm_f32). */
void ak_set_model_bytes(int64_t bytes);
/* Whether a model of this many bytes counts as staying in the last-level cache (half of it). */
int ak_weights_cached(int64_t bytes);

/* Runs a GEMM description (validated by the caller), in parallel. */
void ak_gemm_f32(const ak_gemm* g);

/* Packs a constant B[K][N] (row-major, or transposed: B given as [N][K]) into panels. dst has
 * ceil(N/NR)*K*NR floats. */
void ak_pack_b_f32(const float* b, int64_t K, int64_t N, int transposed, float* dst);

/* out = epilogue(conv2d(x, w)) for n images, NCHW, groups >= 1 (GEMM per group). w is OIHW,
 * or with w_packed, [groups][ceil(cout_g/MR)][C_g*KH*KW][MR] (ak_pack_a_f32 per group). */
void ak_conv2d_f32(const float* x, const float* w, int w_packed, const float* bias,
                   const float* res, float* out, int64_t n, int64_t groups,
                   const ak_conv_geom* g, int64_t cout, ak_epilogue epi, ak_tuning tune);

/* out = epilogue(conv2d(x, w)) for n images in NHWC (channels last): a GEMM whose rows are
 * output pixels and whose columns are output channels, so the packed weights are B and the
 * epilogue's bias runs along the columns. A 1x1, stride-1, unpadded conv reads x in place as A
 * (no copy); any other gathers each block of rows (KH*KW runs of C channels) into a scratch A.
 * w is [groups][ceil(cout_g/NR)][KH][KW][C_g][NR] (weights HWI-ordered along K, ak_pack_b_f32
 * per group); g->C is the channels per group. */
void ak_conv2d_nhwc_f32(const float* x, const float* w, const float* bias, const float* res,
                        float* out, int64_t n, int64_t groups, const ak_conv_geom* g,
                        int64_t cout, ak_epilogue epi, ak_tuning tune);

/* out = epilogue(conv2d(x, w)) for a 3x3, stride-1, undilated, ungrouped conv in NHWC by
 * Winograd F(4x4, 3x3): per block of 4x4 output tiles, the input transform, 36 GEMMs (tiles x C
 * by C x Cout) and the output transform with the epilogue. u is the transformed weight
 * U = G g G^T, packed [36][ceil(cout/NR)][C][NR]. 2.25 multiplies per output instead of 9. */
void ak_conv2d_nhwc_wino_f32(const float* x, const float* u, const float* bias, const float* res,
                             float* out, int64_t n, const ak_conv_geom* g, int64_t cout,
                             ak_epilogue epi, ak_tuning tune);

/* Depthwise conv in NHWC (groups == channels == Cout): w is [KH][KW][C], each output pixel a
 * vector over channels. */
void ak_depthwise_nhwc_f32(const float* x, const float* w, const float* bias, const float* res,
                           float* out, int64_t n, int64_t channels, const ak_conv_geom* g,
                           ak_epilogue epi, int threads);

/* Depthwise conv (groups == channels == Cout, g->C == 1): direct, per channel. */
void ak_depthwise_f32(const float* x, const float* w, const float* bias, const float* res,
                      float* out, int64_t n, int64_t channels, const ak_conv_geom* g,
                      ak_epilogue epi, int threads);

/* out[r] = (x[r] - mean) / sqrt(var + eps) * gamma + beta over rows of length D. */
void ak_layer_norm_f32(const float* x, const float* gamma, const float* beta, float* out,
                       int64_t rows, int64_t D, float eps, int threads);
/* RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * gamma (gamma may be NULL). */
void ak_rms_norm_f32(const float* x, const float* gamma, float* out, int64_t rows, int64_t D,
                     float eps, int threads);

/* out[r] = softmax(x[r]) over rows of length D. */
void ak_softmax_f32(const float* x, float* out, int64_t rows, int64_t D, int threads);

/* Scaled dot-product attention, heads interleaved as the projections write them:
 *   out[b, s, h, :] = softmax(scale * q[b, s, h, :] . k[b, j, h, :] + mask[b, h, s, j] over j)
 *                     @ v[b, :, h, :]
 * q [B][S][H][D], k [B][Sk][H][D], v [B][Sk][H][Dv], out [B][S][H][Dv], row-major. mask (NULL:
 * none) is read at b * m_sb + h * m_sh + s * m_sr + j (a stride of 0 broadcasts). One call: the
 * head split/merge transposes, both matmuls and the softmax. */
typedef struct {
  const float *q, *k, *v, *mask;
  float* out;
  int64_t B, S, Sk, H, D, Dv;
  int64_t m_sb, m_sh, m_sr;
  float scale;
} ak_attention;
void ak_attention_f32(const ak_attention* a, int threads);

/* int8 dense (u8 activations x s8 weights, int32 sums, fp32 out):
 *   out = epilogue(scale * dequant(q(x) @ wq) + bias)
 * Each row of x is quantized when the call runs (dynamic, asymmetric): a_scale = (max(x, 0) -
 * min(x, 0)) / 255, zp = round(-min(x, 0) / a_scale), q = clamp(round(x / a_scale) + zp, 0, 255).
 * The weights are per-output-channel symmetric int8 (w ~ wq * w_scale[n], |wq| <= 127),
 * quantized and packed at compile time as wq[P][K4][AK_NR][4] (K4 = ceil(K/4); 4 consecutive k
 * per column: one VNNI dot product), with qp[2][P*AK_NR] = {w_scale, sum over k of wq} (the sums
 * as exact float integers). dequant(acc) = a_scale * w_scale[n] * (acc - zp * wsum[n]).
 * xq: NULL (each row's own scale and zero point, as above), or a static range calibrated at
 * compile time, xq = {a_scale, zp} for every row: one quantizing pass, no min/max pass.
 * x_u8: x is already u8 on the grid xq (the previous int8 layer's output; K % 4 == 0): used
 * as it is. yq: NULL (out is float32), or {scale, zp}: out is u8, the epilogue's result
 * quantized on that grid (the next int8 layer's input; no residual then).
 * Returns 0, -1 when the scratch memory could not be allocated, -2 for a u8 x without xq (or
 * K % 4 != 0): the FFI refuses those first. */
int ak_dense_u8s8_f32(const void* x, int x_u8, int64_t M, int64_t K, const int8_t* wq,
                      const float* qp, const float* xq, const float* yq, int64_t N,
                      const float* bias, const float* res, void* out, ak_epilogue epi,
                      ak_tuning tune);
/* int8 channels-last convolution (groups 1): the conv GEMM of ak_conv2d_nhwc_f32 over gathered
 * windows, weights wq/qp packed as for the dense kernel over K = (ky, kx, c). xq NULL: each
 * window (output pixel) quantized to u8 like a dense row; xq = {a_scale, zp} (calibrated): the
 * input image quantized once, u8 windows gathered from it (padding = zp, the u8 of 0.0).
 * x_u8 and yq as for ak_dense_u8s8_f32 (a u8 image on the grid xq; a u8 output on yq).
 * Returns 0, -1 when the scratch memory could not be allocated, -2 for a u8 x without xq. */
int ak_conv2d_nhwc_u8s8_f32(const void* x, int x_u8, const int8_t* wq, const float* qp,
                            const float* xq, const float* yq, const float* bias, const float* res,
                            void* out, int64_t n, const ak_conv_geom* g, int64_t cout,
                            ak_epilogue epi, ak_tuning tune);
/* The int8 path the CPU runs: "vnni" (AVX512-VNNI) or "portable". */
const char* ak_int8_path(void);
/* Internal: one path's int8 pieces. quant_rows quantizes rows of x[rows][K] into q (row
 * stride ldq bytes, zero padded to ldq) with each row's own range, quant_fixed with one given
 * range (inv = 1 / scale, zero point z), ukr computes mr (<= AK_MR) rows x one panel. */
typedef void (*ak_quant_rows_fn)(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                 float* scale, int32_t* zp);
typedef void (*ak_quant_fixed_fn)(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                                  float inv, int32_t z);
typedef void (*ak_ukr_i8_fn)(int mr, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* bp,
                             float* c, int64_t ldc, int nv, const float* a_scale,
                             const int32_t* a_zp, const float* w_scale, const float* w_sum,
                             const float* bias, const float* res, int64_t ldr,
                             const ak_epilogue* epi);
void ak_quant_rows_avx512(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                          float* scale, int32_t* zp);
void ak_quant_fixed_avx512(const float* x, int64_t rows, int64_t K, uint8_t* q, int64_t ldq,
                           float inv, int32_t z);
void ak_ukr_i8_vnni(int mr, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* bp, float* c,
                    int64_t ldc, int nv, const float* a_scale, const int32_t* a_zp,
                    const float* w_scale, const float* w_sum, const float* bias, const float* res,
                    int64_t ldr, const ak_epilogue* epi);
typedef struct {
  ak_quant_rows_fn quant_rows;
  ak_quant_fixed_fn quant_fixed;
  ak_ukr_i8_fn ukr;
} ak_int8_table;
/* The int8 pieces of the path the CPU runs (the VNNI ones, or the portable reference). */
const ak_int8_table* ak_int8(void);
/* rows x K values of x quantized on one grid xq = {scale, zero point} into q (row stride ldq),
 * the rows split over up to `threads` threads. */
void ak_quant_fixed_rows(const ak_int8_table* i8, const float* x, int64_t rows, int64_t K, uint8_t* q,
                         int64_t ldq, const float* xq, int threads);
/* One micro-tile of a u8 output: the int8 micro-kernel into a float tile (bias, activation; no
 * residual), each row then quantized on the grid (1 / scale = inv, zero point z) into c. */
void ak_ukr_i8_u8(const ak_int8_table* i8, int mr, int64_t K4, const uint8_t* a, int64_t lda,
                  const int8_t* bp, uint8_t* c, int64_t ldc, int nv, const float* a_scale,
                  const int32_t* a_zp, const float* w_scale, const float* w_sum, const float* bias,
                  const ak_epilogue* epi, float inv, int32_t z);

/* Dense with 16-bit weights (bf16 or fp16), fp32 activations and fp32 sums, for the layers that
 * are bound by reading their weights (few rows: batch-1 GEMVs): half the bytes of fp32.
 *   out = epilogue(scale * x @ W + bias), W as wh[P][K][AK_NR] (fmt 0: bf16, 1: fp16),
 * converted to fp32 in registers. Rows are taken AK_MR at a time per weight panel. */
enum { AK_W16_BF16 = 0, AK_W16_FP16 = 1 };
void ak_dense_w16_f32(const float* x, int64_t M, int64_t K, const uint16_t* wh, int fmt, int64_t N,
                      const float* bias, const float* res, float* out, ak_epilogue epi,
                      ak_tuning tune);
/* The 16-bit-weight kernels' path: "avx512" or "portable" (which is slower than fp32). */
const char* ak_w16_path(void);
typedef void (*ak_ukr_w16_fn)(int mr, int64_t K, const float* a, int64_t lda, const uint16_t* bp,
                              int fmt, float* c, int64_t ldc, int nv, const float* bias,
                              const float* res, int64_t ldr, const ak_epilogue* epi);
void ak_ukr_w16_avx512(int mr, int64_t K, const float* a, int64_t lda, const uint16_t* bp, int fmt,
                       float* c, int64_t ldc, int nv, const float* bias, const float* res,
                       int64_t ldr, const ak_epilogue* epi);

/* Denormals: every kernel call runs with subnormal inputs read as zero and subnormal results
 * flushed to zero (MXCSR DAZ + FTZ) on each thread it uses, and restores the caller's mode.
 * Subnormals carry no information a model keeps, but each one costs an x86 core ~100 cycles
 * of microcode assist: a softmax over a masked row (exp(-90) = 8e-40) made the next batched
 * matmul 27x slower on an Intel core. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned ak_denormals_off(void) {
  const unsigned old = _mm_getcsr();
  _mm_setcsr(old | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
  return old;
}
static inline void ak_denormals_restore(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned ak_denormals_off(void) { return 0; }
static inline void ak_denormals_restore(unsigned old) { (void)old; }
#endif

/* Threading: the parallel-launch function of the process's pool (TVM's
 * TVMBackendParallelLaunch); NULL runs serially. */
typedef struct { void* sync_handle; int32_t num_task; } ak_parallel_env;
typedef int (*ak_parallel_lambda)(int task_id, ak_parallel_env* penv, void* cdata);
typedef int (*ak_parallel_launch_fn)(ak_parallel_lambda f, void* cdata, int num_task);
void ak_set_parallel_launch(ak_parallel_launch_fn fn, int num_threads);
int ak_num_threads(void);
/* Splits [0, n) into one contiguous range per pool thread and runs body on each. */
void ak_parallel_range(void (*body)(int64_t begin, int64_t end, void* ctx), void* ctx, int64_t n);
/* The same on at most `threads` threads (0 = all of the pool's). */
void ak_parallel_range_n(void (*body)(int64_t begin, int64_t end, void* ctx), void* ctx, int64_t n,
                         int threads);

/* Micro-kernels and row epilogues, one set per instruction set (internal). lda == 0: a is one
 * packed micro-panel, A[i][k] = a[k*MR + i]. */
typedef void (*ak_ukr_fn)(int mr, int64_t K, const float* a, int64_t lda, const float* bp,
                          float* c, int64_t ldc, int nv, const float* bias_col,
                          const float* bias_row, const float* res, int64_t ldr,
                          const ak_epilogue* epi);
/* dst[i] = epilogue(src[i]) for a row of n values with one scalar bias (depthwise conv). */
typedef void (*ak_row_epi_fn)(float* dst, const float* src, int64_t n, float bias,
                              const float* res, const ak_epilogue* epi);
typedef void (*ak_rows_fn)(const float* x, const float* gamma, const float* beta, float* out,
                           int64_t D, float eps);
/* One depthwise channel from its zero-padded plane (row stride Wp, readable 64 floats past the
 * last row): out[oy][ox] = epilogue(sum w[ky][kx] pad[oy*SH + ky*DH][ox*SW + kx*DW]). */
typedef void (*ak_dw_plane_fn)(const float* pad, int64_t Wp, const float* w,
                               const ak_conv_geom* g, float bias, const float* res, float* out,
                               const ak_epilogue* epi);
/* im2col of output columns [n0, n0 + nv) of one image into a panel dst[K][NR] (zeros past nv). */
typedef void (*ak_im2col_fn)(const ak_conv_geom* cg, const float* x, int64_t n0, int64_t nv,
                             float* dst);
void ak_im2col_portable(const ak_conv_geom* cg, const float* x, int64_t n0, int64_t nv,
                        float* dst);
/* The columns [n0, n0 + nv) of an im2col panel split into runs within one output row. */
typedef struct { int64_t j, len, oy, ox; } ak_im2col_run;
int ak_im2col_runs(const ak_conv_geom* cg, int64_t n0, int64_t nv, ak_im2col_run runs[AK_NR]);
/* One output row (image x, row oy) of an NHWC depthwise conv over `channels`: out[ox][c] =
 * epilogue(sum over taps inside the input of x[iy][ix][c] * w[ky][kx][c]) with bias[c]. */
typedef void (*ak_dw_nhwc_row_fn)(const float* x, const float* w, const ak_conv_geom* g,
                                  int64_t channels, int64_t oy, const float* bias,
                                  const float* res, float* out, const ak_epilogue* epi);
void ak_dw_nhwc_row_portable(const float* x, const float* w, const ak_conv_geom* g,
                             int64_t channels, int64_t oy, const float* bias, const float* res,
                             float* out, const ak_epilogue* epi);
/* Winograd F(4x4, 3x3), channels last. Input transform of one tile: the 6x6 patch at (iy0, ix0)
 * of an image x[H][W][C] (zeros outside it) -> V[xi][c] = (B^T d B)[xi] at v + xi*vstride + c. */
typedef void (*ak_wino_in_fn)(const float* x, int64_t H, int64_t W, int64_t C, int64_t iy0,
                              int64_t ix0, float* v, int64_t vstride);
/* Output transform of one tile, channels [0, nc): M[xi][c] at m + xi*mstride + c (readable up to
 * the next multiple of 16 channels) -> Y = A^T M A, the 4x4 pixels at (oy0, ox0) that lie inside
 * OH x OW, written as epilogue(Y + bias[c]) to out + (oy*OW + ox)*ldo + c (res alike). */
typedef void (*ak_wino_out_fn)(const float* m, int64_t mstride, int64_t nc, float* out,
                               const float* res, int64_t OH, int64_t OW, int64_t ldo, int64_t oy0,
                               int64_t ox0, const float* bias, const ak_epilogue* epi);
void ak_wino_in_portable(const float* x, int64_t H, int64_t W, int64_t C, int64_t iy0,
                         int64_t ix0, float* v, int64_t vstride);
void ak_wino_out_portable(const float* m, int64_t mstride, int64_t nc, float* out,
                          const float* res, int64_t OH, int64_t OW, int64_t ldo, int64_t oy0,
                          int64_t ox0, const float* bias, const ak_epilogue* epi);
typedef struct {
  ak_ukr_fn ukr;
  ak_im2col_fn im2col;
  ak_dw_plane_fn dw_plane; /* NULL: the driver's generic loops */
  ak_row_epi_fn row_epi;
  ak_rows_fn layer_norm_row;
  ak_rows_fn softmax_row; /* gamma/beta/eps unused */
  ak_dw_nhwc_row_fn dw_nhwc_row;
  ak_wino_in_fn wino_in;
  ak_wino_out_fn wino_out;
  int rows; /* rows ukr takes in one call with a row-major A (lda > 0); packed A: AK_MR */
  int segments; /* ukr honours ak_epilogue.nseg (row-major A only) */
  /* NULL: ak_pack_t_portable. dst[p][c][j] = src[(p*NR + j)*lds + c] for rows x cols of src
   * (row stride lds < 2^25): the transpose of rows into B panels (attention's K^T), zeros past
   * the last row */
  void (*pack_t)(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst);
  /* NULL: softmax_row per row. out = softmax(x) over rows of D (row stride ld for both; out
   * may be x), the same values as softmax_row, several rows interleaved so that one row's
   * reductions and exp chains overlap the others' */
  void (*softmax_rows)(const float* x, float* out, int64_t ld, int64_t rows, int64_t D);
  /* out = x / sqrt(mean(x^2) + eps) * gamma (gamma may be NULL; beta unused): RMSNorm */
  ak_rows_fn rms_norm_row;
} ak_isa_table;
void ak_pack_t_portable(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst);
/* The transposing packer of the ISA in use (pack_t, or the portable one for lds >= 2^25). */
void ak_pack_t_f32(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst);
/* Softmax over rows of D (row stride ld; out may be x) with t's softmax_rows, or its
 * softmax_row per row where the ISA has no multi-row one. */
void ak_softmax_rows(const ak_isa_table* t, const float* x, float* out, int64_t ld, int64_t rows,
                     int64_t D);
extern const ak_isa_table ak_portable_table;
extern const ak_isa_table ak_avx2_table;
extern const ak_isa_table ak_avx512_table;
const ak_isa_table* ak_table(void);

/* Instruction set in use: the best the CPU has, at most ak_isa_cap (ACCELKIT_KERNEL_ISA), or
 * portable when forced (ACCELKIT_PORTABLE_KERNELS). */
enum { AK_ISA_PORTABLE = 0, AK_ISA_AVX2 = 1, AK_ISA_AVX512 = 2 };
int ak_isa(void);
extern int ak_force_portable;
extern int ak_isa_cap;

#ifdef __cplusplus
}
#endif
#endif
