/* TVM-FFI glue: destination-passing safe_call wrappers that check every argument (dtype, rank,
 * shape, device, contiguity, attribute ranges) before touching memory, and register them as
 * global functions `accelkit.cpu.<kernel>` callable from R.call_dps_packed. The only file that
 * sees TVM headers. An "absent" optional tensor (bias, residual) is passed as a 0-element one.
 * Every kernel also takes an optional int64 tuning `config` just before `out` (ak_tuning: thread
 * count, work split, loop order); without it, or with 0, it runs its built-in heuristics. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>
#include "ak_kernels.h"

typedef struct {
  const char* kernel;
  const TVMFFIAny* args;
  int32_t num_args;
} ak_call;

static int ak_fail(const ak_call* c, const char* kind, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

#include <stdarg.h>
static int ak_fail(const ak_call* c, const char* kind, const char* fmt, ...) {
  char detail[400], msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof(detail), fmt, ap);
  va_end(ap);
  snprintf(msg, sizeof(msg), "accelkit kernel %s: %s", c->kernel, detail);
  TVMFFIErrorSetRaisedFromCStr(kind, msg);
  return -1;
}

static DLTensor* ak_tensor_or_null(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) /* object layout: {TVMFFIObject header, DLTensor, ...} */
    return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return NULL;
}

static int64_t ak_numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

/* A contiguous CPU tensor of dtype (code, bits) (any dtype for code -1) with rank in
 * [rmin, rmax]; NULL after raising otherwise. */
static DLTensor* ak_typed(const ak_call* c, int i, const char* what, int rmin, int rmax, int code,
                          int bits, const char* dtype) {
  DLTensor* t = ak_tensor_or_null(&c->args[i]);
  if (!t) {
    ak_fail(c, "TypeError", "argument %d (%s) must be a tensor (type index %d)", i, what,
            (int)c->args[i].type_index);
    return NULL;
  }
  if (t->device.device_type != kDLCPU) {
    ak_fail(c, "ValueError", "%s must be on the CPU (device type %d)", what,
            (int)t->device.device_type);
    return NULL;
  }
  if (code >= 0 && (t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1)) {
    ak_fail(c, "TypeError", "%s must be %s (got dtype code %d, %d bits)", what, dtype,
            (int)t->dtype.code, (int)t->dtype.bits);
    return NULL;
  }
  if (t->ndim < rmin || t->ndim > rmax) {
    ak_fail(c, "ValueError", "%s must have rank %d..%d (got %d)", what, rmin, rmax, (int)t->ndim);
    return NULL;
  }
  if (ak_numel(t) > 0 && t->data == NULL) {
    ak_fail(c, "ValueError", "%s has no data", what);
    return NULL;
  }
  if (t->strides && ak_numel(t) > 0) { /* an empty tensor has no layout to check */
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
      if (t->shape[d] != 1 && t->strides[d] != expect) {
        ak_fail(c, "ValueError", "%s must be contiguous (dim %d has stride %lld)", what, d,
                (long long)t->strides[d]);
        return NULL;
      }
      expect *= t->shape[d];
    }
  }
  return t;
}

static DLTensor* ak_f32(const ak_call* c, int i, const char* what, int rmin, int rmax) {
  return ak_typed(c, i, what, rmin, rmax, kDLFloat, 32, "float32");
}

static int ak_int(const ak_call* c, int i, const char* what, int64_t lo, int64_t hi, int64_t* out) {
  const TVMFFIAny* a = &c->args[i];
  if (a->type_index != kTVMFFIInt && a->type_index != kTVMFFIBool)
    return ak_fail(c, "TypeError", "argument %d (%s) must be an int (type index %d)", i, what,
                   (int)a->type_index);
  if (a->v_int64 < lo || a->v_int64 > hi)
    return ak_fail(c, "ValueError", "%s=%lld is out of range [%lld, %lld]", what,
                   (long long)a->v_int64, (long long)lo, (long long)hi);
  *out = a->v_int64;
  return 0;
}

static int ak_float(const ak_call* c, int i, const char* what, float* out) {
  const TVMFFIAny* a = &c->args[i];
  if (a->type_index == kTVMFFIFloat) *out = (float)a->v_float64;
  else if (a->type_index == kTVMFFIInt) *out = (float)a->v_int64;
  else
    return ak_fail(c, "TypeError", "argument %d (%s) must be a float (type index %d)", i, what,
                   (int)a->type_index);
  return 0;
}

#define AK_DATA(t) ((float*)((char*)(t)->data + (t)->byte_offset))
#define AK_OPT(t) (ak_numel(t) > 0 ? AK_DATA(t) : NULL)
#define AK_TRY(e) do { if ((e) != 0) return -1; } while (0)
#define AK_NEED(t) do { if ((t) == NULL) return -1; } while (0)

/* Packed weight panels are read with aligned 64-byte vector loads. */
static int ak_aligned(const ak_call* c, const DLTensor* t, const char* what) {
  if (((uintptr_t)AK_DATA(t)) % 64 != 0)
    return ak_fail(c, "ValueError", "%s must be 64-byte aligned (pass a tvm.runtime tensor, "
                   "which is, not a view of another buffer)", what);
  return 0;
}

/* n arguments (sig), or n + 1 with an int64 tuning `config` just before the last (out). */
static int ak_nargs(const ak_call* c, int n, const char* sig) {
  if (c->num_args != n && c->num_args != n + 1)
    return ak_fail(c, "TypeError", "expected %d arguments (%s), or %d with a tuning config "
                   "before out, got %d", n, sig, n + 1, (int)c->num_args);
  return 0;
}

/* The optional tuning config (see ak_tuning in ak_kernels.h); zeros when absent. */
static int ak_config(const ak_call* c, int n, ak_tuning* t) {
  memset(t, 0, sizeof(*t));
  if (c->num_args == n) return 0;
  int64_t config = 0;
  AK_TRY(ak_int(c, n - 1, "config", 0, ((int64_t)1 << 28) - 1, &config));
  *t = ak_tuning_unpack(config);
  const int kcode = (int)((config >> 24) & 0xf);
  if (t->grain > AK_TUNE_MAX_GRAIN || t->order > 2 || t->loop > 1 || kcode > AK_TUNE_MAX_KC_CODE)
    return ak_fail(c, "ValueError", "config %lld has grain %d (max %d), order %d (max 2), "
                   "loop %d (max 1), K-block code %d (max %d)", (long long)config, t->grain,
                   AK_TUNE_MAX_GRAIN, t->order, t->loop, kcode, AK_TUNE_MAX_KC_CODE);
  return 0;
}

static int ak_same_shape(const ak_call* c, const DLTensor* t, const DLTensor* ref,
                         const char* what, const char* refname) {
  if (t->ndim != ref->ndim)
    return ak_fail(c, "ValueError", "%s must have the shape of %s (rank %d vs %d)", what,
                   refname, (int)t->ndim, (int)ref->ndim);
  for (int d = 0; d < t->ndim; ++d)
    if (t->shape[d] != ref->shape[d])
      return ak_fail(c, "ValueError", "%s must have the shape of %s (dim %d: %lld vs %lld)",
                     what, refname, d, (long long)t->shape[d], (long long)ref->shape[d]);
  return 0;
}

/* Reads (act, res_mode, lo, hi, scale) starting at argument i. */
static int ak_epi(const ak_call* c, int i, ak_epilogue* e) {
  int64_t act, res_mode;
  memset(e, 0, sizeof(*e));
  AK_TRY(ak_int(c, i, "act", 0, AK_ACT_COUNT_ - 1, &act));
  AK_TRY(ak_int(c, i + 1, "res_mode", 0, AK_RES_MUL, &res_mode));
  AK_TRY(ak_float(c, i + 2, "lo", &e->lo));
  AK_TRY(ak_float(c, i + 3, "hi", &e->hi));
  AK_TRY(ak_float(c, i + 4, "scale", &e->scale));
  e->act = (int)act;
  e->res_mode = (int)res_mode;
  return 0;
}

/* The dense kernels' common checks: out is x's shape with last dim N, bias has N elements (or
 * none), res is out's shape when the epilogue adds it. */
static int ak_dense_io(const ak_call* c, const DLTensor* x, const DLTensor* out, const DLTensor* bias,
                       const DLTensor* res, int64_t N, const ak_epilogue* e) {
  if (out->ndim != x->ndim || out->shape[out->ndim - 1] != N)
    return ak_fail(c, "ValueError", "out must be x's shape with last dim N=%lld", (long long)N);
  for (int d = 0; d + 1 < x->ndim; ++d)
    if (out->shape[d] != x->shape[d])
      return ak_fail(c, "ValueError", "out dim %d is %lld, x has %lld", d,
                     (long long)out->shape[d], (long long)x->shape[d]);
  if (ak_numel(bias) != 0 && ak_numel(bias) != N)
    return ak_fail(c, "ValueError", "bias must have N=%lld elements (got %lld)", (long long)N,
                   (long long)ak_numel(bias));
  if (e->res_mode != AK_RES_NONE) AK_TRY(ak_same_shape(c, res, out, "res", "out"));
  return 0;
}

/* dense(x[..., K], wp[P, K, NR], bias[N] | [0], res[..., N] | [0], N, act, res_mode, lo, hi,
 *       scale, out[..., N]): out = epilogue(x @ W + bias), W packed by ak_pack_b_f32. */
static int ak_dense(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.dense", args, n};
  AK_TRY(ak_nargs(&c, 11, "x, w_packed, bias, res, N, act, res_mode, lo, hi, scale, out"));
  DLTensor *x, *w, *bias, *res, *out;
  AK_NEED(x = ak_f32(&c, 0, "x", 1, 8));
  AK_NEED(w = ak_f32(&c, 1, "w_packed", 3, 3));
  AK_NEED(bias = ak_f32(&c, 2, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 3, "res", 1, 8));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 1, 8));
  int64_t N;
  ak_epilogue e;
  ak_tuning tune;
  AK_TRY(ak_config(&c, 11, &tune));
  AK_TRY(ak_int(&c, 4, "N", 1, (int64_t)1 << 40, &N));
  AK_TRY(ak_epi(&c, 5, &e));
  AK_TRY(ak_aligned(&c, w, "w_packed"));
  const int64_t K = x->shape[x->ndim - 1];
  if (w->shape[0] != (N + AK_NR - 1) / AK_NR || w->shape[1] != K || w->shape[2] != AK_NR)
    return ak_fail(&c, "ValueError", "w_packed must be [%lld, %lld, %d] for K=%lld, N=%lld "
                   "(got [%lld, %lld, %lld])", (long long)((N + AK_NR - 1) / AK_NR),
                   (long long)K, AK_NR, (long long)K, (long long)N, (long long)w->shape[0],
                   (long long)w->shape[1], (long long)w->shape[2]);
  AK_TRY(ak_dense_io(&c, x, out, bias, res, N, &e));
  ak_gemm g;
  memset(&g, 0, sizeof(g));
  g.batch = 1; g.M = ak_numel(x) / (K ? K : 1); g.N = N; g.K = K;
  if (K == 0) g.M = ak_numel(out) / N;
  g.a = AK_DATA(x); g.lda = K;
  g.b = AK_DATA(w); g.b_prepacked = 1;
  g.c = AK_DATA(out); g.ldc = N;
  g.bias = AK_OPT(bias);
  g.res = e.res_mode ? AK_DATA(res) : NULL; g.ldr = N;
  g.epi = e;
  g.epi.bias_mode = g.bias ? AK_BIAS_COL : AK_BIAS_NONE;
  g.tune = tune;
  ak_gemm_f32(&g);
  return 0;
}

/* The int8 kernels' weights for K inputs and N outputs: wq [ceil(N/NR), ceil(K/4), NR, 4] and
 * qp [2, ceil(N/NR)*NR] (scales, column sums); `what` (printf) names the layer in the error. */
static int ak_int8_weights(const ak_call* c, const DLTensor* w, const DLTensor* qp, int64_t K,
                           int64_t N, const char* what, ...) __attribute__((format(printf, 6, 7)));
static int ak_int8_weights(const ak_call* c, const DLTensor* w, const DLTensor* qp, int64_t K,
                           int64_t N, const char* what, ...) {
  char layer[160];
  va_list ap;
  va_start(ap, what);
  vsnprintf(layer, sizeof(layer), what, ap);
  va_end(ap);
  const int64_t P = (N + AK_NR - 1) / AK_NR, K4 = (K + 3) / 4;
  /* the column sums travel as float32: exact while K * 127 < 2^24 */
  if (K > ((int64_t)1 << 24) / 127)
    return ak_fail(c, "ValueError", "K=%lld is too long for the int8 kernels (at most %lld)",
                   (long long)K, (long long)(((int64_t)1 << 24) / 127));
  if (w->shape[0] != P || w->shape[1] != K4 || w->shape[2] != AK_NR || w->shape[3] != 4)
    return ak_fail(c, "ValueError", "w_int8 must be [%lld, %lld, %d, 4] for %s (got [%lld, %lld, "
                   "%lld, %lld])", (long long)P, (long long)K4, AK_NR, layer, (long long)w->shape[0],
                   (long long)w->shape[1], (long long)w->shape[2], (long long)w->shape[3]);
  if (qp->shape[0] != 2 || qp->shape[1] != P * AK_NR)
    return ak_fail(c, "ValueError", "w_qparams must be [2, %lld] (scales, column sums) for %s "
                   "(got [%lld, %lld])", (long long)(P * AK_NR), layer, (long long)qp->shape[0],
                   (long long)qp->shape[1]);
  return 0;
}

/* One (scale, zero point) pair: scale finite and > 0 with a finite inverse, the zero point an
 * integer in [0, 255]. */
static int ak_grid_ok(const float* v) {
  return v[0] > 0.f && isfinite(v[0]) && isfinite(1.f / v[0]) && v[1] >= 0.f && v[1] <= 255.f &&
         v[1] == nearbyintf(v[1]);
}

/* act_qparams: [0] (x's rows each on their own range, at run time; float32 out), [2] = {scale,
 * zero point} of x (a calibrated range), or [4] = {x's pair or 0, 0 (dynamic rows), out's pair}:
 * out is u8 on that grid (the next int8 layer's input). A u8 x must be on a given grid, a u8
 * out needs the 4 values and no residual. */
static int ak_act_qparams(const ak_call* c, const DLTensor* aq, const DLTensor* x, const DLTensor* out,
                          const ak_epilogue* e, const float** xq, const float** yq) {
  *xq = *yq = NULL;
  const int64_t n = ak_numel(aq);
  const float* v = n ? AK_DATA(aq) : NULL;
  const int dynamic = n == 4 && v[0] == 0.f && v[1] == 0.f;
  if ((n != 0 && n != 2 && n != 4) || (n >= 2 && !dynamic && !ak_grid_ok(v)) || (n == 4 && !ak_grid_ok(v + 2)))
    return ak_fail(c, "ValueError", "act_qparams must be [] (dynamic), [scale > 0, zero point in "
                   "0..255] (a calibrated range of x) or 4 values (x's range or 0, 0, then out's); "
                   "got %lld values", (long long)n);
  if (n >= 2 && !dynamic) *xq = v;
  if (n == 4) *yq = v + 2;
  const int x_u8 = x->dtype.code == kDLUInt, out_u8 = out->dtype.code == kDLUInt;
  if (x_u8 && !*xq)
    return ak_fail(c, "ValueError", "a uint8 x needs its grid: act_qparams [scale, zero point, ...]");
  if (out_u8 != (*yq != NULL))
    return ak_fail(c, "ValueError", "out must be %s with %lld act_qparams", *yq ? "uint8" : "float32",
                   (long long)n);
  if (out_u8 && e->res_mode != AK_RES_NONE)
    return ak_fail(c, "ValueError", "a uint8 out takes no residual (res_mode must be 0)");
  return 0;
}

/* x or out: a float32 tensor, or a uint8 one (a u8 activation between int8 layers). */
static DLTensor* ak_f32_or_u8(const ak_call* c, int i, const char* what, int rmin, int rmax) {
  DLTensor* t = ak_tensor_or_null(&c->args[i]);
  if (t && t->dtype.code == kDLUInt) return ak_typed(c, i, what, rmin, rmax, kDLUInt, 8, "float32 or uint8");
  return ak_typed(c, i, what, rmin, rmax, kDLFloat, 32, "float32 or uint8");
}

/* dense_i8(x[..., K] f32 | u8, wq int8 [P, K4, NR, 4], qp[2, P*NR], act_qparams[0 | 2 | 4],
 *          bias[N] | [0], res[..., N] | [0], N, act, res_mode, lo, hi, scale,
 *          out[..., N] f32 | u8): the int8 dense of ak_dense_u8s8_f32. */
static int ak_dense_i8(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.dense_i8", args, n};
  AK_TRY(ak_nargs(&c, 13, "x, w_int8, w_qparams, act_qparams, bias, res, N, act, res_mode, lo, hi, "
                          "scale, out"));
  DLTensor *x, *w, *qp, *aqp, *bias, *res, *out;
  AK_NEED(x = ak_f32_or_u8(&c, 0, "x", 1, 8));
  AK_NEED(w = ak_typed(&c, 1, "w_int8", 4, 4, kDLInt, 8, "int8"));
  AK_NEED(qp = ak_f32(&c, 2, "w_qparams", 2, 2));
  AK_NEED(aqp = ak_f32(&c, 3, "act_qparams", 1, 1));
  AK_NEED(bias = ak_f32(&c, 4, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 5, "res", 1, 8));
  AK_NEED(out = ak_f32_or_u8(&c, n - 1, "out", 1, 8));
  int64_t N;
  ak_epilogue e;
  ak_tuning tune;
  const float *xq, *yq;
  AK_TRY(ak_config(&c, 13, &tune));
  AK_TRY(ak_int(&c, 6, "N", 1, (int64_t)1 << 40, &N));
  AK_TRY(ak_epi(&c, 7, &e));
  AK_TRY(ak_act_qparams(&c, aqp, x, out, &e, &xq, &yq));
  AK_TRY(ak_aligned(&c, w, "w_int8"));
  const int64_t K = x->shape[x->ndim - 1];
  AK_TRY(ak_int8_weights(&c, w, qp, K, N, "K=%lld, N=%lld", (long long)K, (long long)N));
  AK_TRY(ak_dense_io(&c, x, out, bias, res, N, &e));
  const int64_t M = K ? ak_numel(x) / K : ak_numel(out) / N;
  const int x_u8 = x->dtype.code == kDLUInt;
  if (x_u8 && K % 4 != 0)
    return ak_fail(&c, "ValueError", "a uint8 x needs K %% 4 == 0 (got K=%lld)", (long long)K);
  if (ak_dense_u8s8_f32(AK_DATA(x), x_u8, M, K, (const int8_t*)((char*)w->data + w->byte_offset),
                        AK_DATA(qp), xq, yq, N, AK_OPT(bias), e.res_mode ? AK_DATA(res) : NULL,
                        AK_DATA(out), e, tune) != 0)
    return ak_fail(&c, "MemoryError", "could not allocate %lld bytes for the quantized rows",
                   (long long)(M * ((K + 3) / 4) * 4));
  return 0;
}

/* dense_w16(x[..., K], wh uint16 [P, K, NR], bias[N] | [0], res[..., N] | [0], N, fmt (0 bf16,
 *           1 fp16), act, res_mode, lo, hi, scale, out[..., N]): ak_dense_w16_f32. */
static int ak_dense_w16(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.dense_w16", args, n};
  AK_TRY(ak_nargs(&c, 12, "x, w_16bit, bias, res, N, fmt, act, res_mode, lo, hi, scale, out"));
  DLTensor *x, *w, *bias, *res, *out;
  AK_NEED(x = ak_f32(&c, 0, "x", 1, 8));
  AK_NEED(w = ak_typed(&c, 1, "w_16bit", 3, 3, kDLUInt, 16, "uint16 (bf16 or fp16 bits)"));
  AK_NEED(bias = ak_f32(&c, 2, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 3, "res", 1, 8));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 1, 8));
  int64_t N, fmt;
  ak_epilogue e;
  ak_tuning tune;
  AK_TRY(ak_config(&c, 12, &tune));
  AK_TRY(ak_int(&c, 4, "N", 1, (int64_t)1 << 40, &N));
  AK_TRY(ak_int(&c, 5, "fmt", AK_W16_BF16, AK_W16_FP16, &fmt));
  AK_TRY(ak_epi(&c, 6, &e));
  AK_TRY(ak_aligned(&c, w, "w_16bit"));
  const int64_t K = x->shape[x->ndim - 1], P = (N + AK_NR - 1) / AK_NR;
  if (w->shape[0] != P || w->shape[1] != K || w->shape[2] != AK_NR)
    return ak_fail(&c, "ValueError", "w_16bit must be [%lld, %lld, %d] for K=%lld, N=%lld "
                   "(got [%lld, %lld, %lld])", (long long)P, (long long)K, AK_NR, (long long)K,
                   (long long)N, (long long)w->shape[0], (long long)w->shape[1],
                   (long long)w->shape[2]);
  AK_TRY(ak_dense_io(&c, x, out, bias, res, N, &e));
  const int64_t M = K ? ak_numel(x) / K : ak_numel(out) / N;
  ak_dense_w16_f32(AK_DATA(x), M, K, (const uint16_t*)((char*)w->data + w->byte_offset), (int)fmt,
                   N, AK_OPT(bias), e.res_mode ? AK_DATA(res) : NULL, AK_DATA(out), e, tune);
  return 0;
}

static void pack_transposed(const ak_gemm* g, int64_t bi, int64_t n0, float* dst) {
  /* B[k][n] = b[n][k]: b is [N, K] row-major per batch; one panel of up to NR rows of it */
  ak_pack_t_f32(g->b + bi * g->b_bstride + n0 * g->ldb, g->ldb, g->N - n0 < AK_NR ? g->N - n0 : AK_NR,
                g->K, dst);
}

/* bmm(a[..., M, K], b[..., K, N] (or [..., N, K] with trans_b), res | [0], trans_b, scale,
 *     out[..., M, N]) = scale * a @ b + res; b's batch is a's or 1 (broadcast); res broadcasts
 *     to out (an attention mask: [..., M or 1, N], leading dims out's or all 1). */
static int ak_bmm(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.bmm", args, n};
  AK_TRY(ak_nargs(&c, 6, "a, b, res, trans_b, scale, out"));
  DLTensor *a, *b, *res, *out;
  AK_NEED(a = ak_f32(&c, 0, "a", 2, 8));
  AK_NEED(b = ak_f32(&c, 1, "b", 2, 8));
  AK_NEED(res = ak_f32(&c, 2, "res", 1, 8));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 2, 8));
  int64_t trans_b;
  float scale;
  ak_tuning tune;
  AK_TRY(ak_config(&c, 6, &tune));
  AK_TRY(ak_int(&c, 3, "trans_b", 0, 1, &trans_b));
  AK_TRY(ak_float(&c, 4, "scale", &scale));
  const int64_t M = a->shape[a->ndim - 2], K = a->shape[a->ndim - 1];
  const int64_t bK = b->shape[b->ndim - (trans_b ? 1 : 2)];
  const int64_t N = b->shape[b->ndim - (trans_b ? 2 : 1)];
  if (bK != K)
    return ak_fail(&c, "ValueError", "a has K=%lld but b has %lld", (long long)K, (long long)bK);
  const int64_t batch = ak_numel(a) / (M * K > 0 ? M * K : 1);
  const int64_t bbatch = ak_numel(b) / (K * N > 0 ? K * N : 1);
  if (bbatch != batch && bbatch != 1)
    return ak_fail(&c, "ValueError", "b's batch (%lld) must be a's (%lld) or 1",
                   (long long)bbatch, (long long)batch);
  if (out->ndim != a->ndim || out->shape[out->ndim - 2] != M || out->shape[out->ndim - 1] != N ||
      ak_numel(out) != batch * M * N)
    return ak_fail(&c, "ValueError", "out must be [..., %lld, %lld] with a's batch",
                   (long long)M, (long long)N);
  /* res (attention's additive mask) broadcasts like numpy: its leading dims are out's or all 1,
   * and it has M rows or one */
  const int has_res = ak_numel(res) > 0;
  int64_t r_rows = M, r_batch = batch;
  if (has_res) {
    int ok = res->ndim <= out->ndim && res->shape[res->ndim - 1] == N;
    r_rows = res->ndim >= 2 ? res->shape[res->ndim - 2] : 1;
    ok = ok && (r_rows == M || r_rows == 1);
    r_batch = 1;
    for (int d = 0; d + 2 < res->ndim; ++d) r_batch *= res->shape[d];
    for (int d = 0; ok && r_batch != 1 && d + 2 < out->ndim; ++d) {
      const int rd = d - (out->ndim - res->ndim); /* res's dim aligned with out's dim d */
      ok = rd >= 0 && res->shape[rd] == out->shape[d];
    }
    if (!ok)
      return ak_fail(&c, "ValueError",
                     "res must broadcast to out [..., %lld, %lld]: [..., %lld or 1, %lld] with "
                     "out's leading dims or all 1", (long long)M, (long long)N, (long long)M,
                     (long long)N);
  }
  if (M == 0 || N == 0 || batch == 0) return 0;
  ak_gemm g;
  memset(&g, 0, sizeof(g));
  g.batch = batch; g.M = M; g.N = N; g.K = K;
  g.a = AK_DATA(a); g.lda = K; g.a_bstride = M * K;
  g.b = AK_DATA(b); g.ldb = trans_b ? K : N; g.b_bstride = bbatch == 1 ? 0 : K * N;
  g.pack = trans_b ? pack_transposed : NULL;
  g.c = AK_DATA(out); g.ldc = N; g.c_bstride = M * N;
  g.res = has_res ? AK_DATA(res) : NULL;
  g.ldr = r_rows == 1 ? 0 : N;
  g.r_bstride = r_batch == 1 ? 0 : r_rows * N;
  g.epi.scale = scale;
  g.epi.res_mode = has_res ? AK_RES_POST_ACT : AK_RES_NONE;
  g.tune = tune;
  ak_gemm_f32(&g);
  return 0;
}

/* conv2d(x[N, C, H, W], w, bias[Cout] | [0], res | [0], groups, SH, SW, PH, PW, DH, DW, act,
 *        res_mode, lo, hi, scale, out[N, Cout, OH, OW]); w is OIHW [Cout, C/groups, KH, KW] or
 *        packed [groups, ceil(Cout/groups/MR), C/groups, KH, KW, MR]. PH/PW are the top/left
 *        pads (the bottom/right ones follow from OH/OW; reads outside the input are zeros). */
static int ak_conv2d(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.conv2d", args, n};
  AK_TRY(ak_nargs(&c, 17, "x, w, bias, res, groups, SH, SW, PH, PW, DH, DW, act, res_mode, lo, "
                          "hi, scale, out"));
  DLTensor *x, *w, *bias, *res, *out;
  AK_NEED(x = ak_f32(&c, 0, "x", 4, 4));
  AK_NEED(w = ak_f32(&c, 1, "w", 4, 6));
  AK_NEED(bias = ak_f32(&c, 2, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 3, "res", 1, 4));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 4, 4));
  ak_tuning tune;
  AK_TRY(ak_config(&c, 17, &tune));
  int64_t groups, v[6];
  static const char* names[6] = {"stride_h", "stride_w", "pad_top", "pad_left", "dilation_h",
                                 "dilation_w"};
  AK_TRY(ak_int(&c, 4, "groups", 1, 1 << 20, &groups));
  for (int i = 0; i < 6; ++i)
    AK_TRY(ak_int(&c, 5 + i, names[i], (i == 2 || i == 3) ? 0 : 1, 1 << 20, &v[i]));
  ak_epilogue e;
  AK_TRY(ak_epi(&c, 11, &e));
  const int64_t N = x->shape[0], C = x->shape[1], cout = out->shape[1];
  const int packed = w->ndim == 6;
  if (w->ndim == 5)
    return ak_fail(&c, "ValueError", "w must be OIHW (rank 4) or packed (rank 6), not rank 5");
  const int64_t cg = packed ? w->shape[2] : w->shape[1];
  const int64_t kh = packed ? w->shape[3] : w->shape[2], kw = packed ? w->shape[4] : w->shape[3];
  if (C % groups || cout % groups || cg != C / groups)
    return ak_fail(&c, "ValueError", "w (%lld input channels per group) does not fit %lld input "
                   "channels in %lld groups", (long long)cg, (long long)C, (long long)groups);
  if (packed) {
    const int64_t tiles = (cout / groups + AK_MR - 1) / AK_MR;
    if (w->shape[0] != groups || w->shape[1] != tiles || w->shape[5] != AK_MR)
      return ak_fail(&c, "ValueError", "packed w must be [%lld, %lld, C/groups, KH, KW, %d] for "
                     "%lld output channels", (long long)groups, (long long)tiles, AK_MR,
                     (long long)cout);
  } else if (w->shape[0] != cout) {
    return ak_fail(&c, "ValueError", "w has %lld output channels but out has %lld",
                   (long long)w->shape[0], (long long)cout);
  }
  if (out->shape[0] != N)
    return ak_fail(&c, "ValueError", "out must be [%lld, Cout, OH, OW]", (long long)N);
  if (ak_numel(bias) != 0 && ak_numel(bias) != cout)
    return ak_fail(&c, "ValueError", "bias must have %lld elements", (long long)cout);
  if (e.res_mode != AK_RES_NONE) AK_TRY(ak_same_shape(&c, res, out, "res", "out"));
  ak_conv_geom g = {C / groups, x->shape[2], x->shape[3], kh, kw,
                    out->shape[2], out->shape[3], v[0], v[1], v[2], v[3], v[4], v[5]};
  if (ak_numel(out) == 0) return 0;
  const float* b = AK_OPT(bias);
  const float* r = e.res_mode ? AK_DATA(res) : NULL;
  if (!packed && groups == C && groups == cout && groups > 1)
    ak_depthwise_f32(AK_DATA(x), AK_DATA(w), b, r, AK_DATA(out), N, C, &g, e, tune.threads);
  else
    ak_conv2d_f32(AK_DATA(x), AK_DATA(w), packed, b, r, AK_DATA(out), N, groups, &g, cout, e,
                  tune);
  return 0;
}

/* conv2d_nhwc(x[N, H, W, C], w, bias[Cout] | [0], res | [0], groups, SH, SW, PH, PW, DH, DW,
 *             act, res_mode, lo, hi, scale, out[N, OH, OW, Cout]), channels last. w is packed
 *             [groups, ceil(Cout/groups/NR), KH, KW, C/groups, NR] (the GEMM path), or, for a
 *             depthwise conv (groups == C == Cout), [KH, KW, C], or, for a 3x3 stride-1
 *             undilated ungrouped conv, Winograd-transformed [36, ceil(Cout/NR), C, NR]. Pads
 *             as in conv2d. */
static int ak_conv2d_nhwc(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.conv2d_nhwc", args, n};
  AK_TRY(ak_nargs(&c, 17, "x, w, bias, res, groups, SH, SW, PH, PW, DH, DW, act, res_mode, lo, "
                          "hi, scale, out"));
  DLTensor *x, *w, *bias, *res, *out;
  AK_NEED(x = ak_f32(&c, 0, "x", 4, 4));
  AK_NEED(w = ak_f32(&c, 1, "w", 3, 6));
  AK_NEED(bias = ak_f32(&c, 2, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 3, "res", 1, 4));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 4, 4));
  ak_tuning tune;
  AK_TRY(ak_config(&c, 17, &tune));
  int64_t groups, v[6];
  static const char* names[6] = {"stride_h", "stride_w", "pad_top", "pad_left", "dilation_h",
                                 "dilation_w"};
  AK_TRY(ak_int(&c, 4, "groups", 1, 1 << 20, &groups));
  for (int i = 0; i < 6; ++i)
    AK_TRY(ak_int(&c, 5 + i, names[i], (i == 2 || i == 3) ? 0 : 1, 1 << 20, &v[i]));
  ak_epilogue e;
  AK_TRY(ak_epi(&c, 11, &e));
  const int64_t N = x->shape[0], C = x->shape[3], cout = out->shape[3];
  if (C % groups || cout % groups)
    return ak_fail(&c, "ValueError", "%lld input and %lld output channels do not split into "
                   "%lld groups", (long long)C, (long long)cout, (long long)groups);
  const int depthwise = w->ndim == 3;
  int64_t kh, kw;
  if (depthwise) {
    if (groups != C || cout != C || w->shape[2] != C)
      return ak_fail(&c, "ValueError", "a rank-3 w [KH, KW, C] is the depthwise form: it needs "
                     "groups == C == Cout == w.shape[2] (got groups=%lld, C=%lld, Cout=%lld, "
                     "w.shape[2]=%lld)", (long long)groups, (long long)C, (long long)cout,
                     (long long)w->shape[2]);
    kh = w->shape[0];
    kw = w->shape[1];
  } else if (w->ndim == 6) {
    const int64_t tiles = (cout / groups + AK_NR - 1) / AK_NR;
    if (w->shape[0] != groups || w->shape[1] != tiles || w->shape[4] != C / groups ||
        w->shape[5] != AK_NR)
      return ak_fail(&c, "ValueError", "packed w must be [%lld, %lld, KH, KW, %lld, %d] for %lld "
                     "groups, %lld input and %lld output channels", (long long)groups,
                     (long long)tiles, (long long)(C / groups), AK_NR, (long long)groups,
                     (long long)C, (long long)cout);
    AK_TRY(ak_aligned(&c, w, "packed w"));
    kh = w->shape[2];
    kw = w->shape[3];
  } else if (w->ndim == 4) {
    const int64_t tiles = (cout + AK_NR - 1) / AK_NR;
    if (w->shape[0] != 36 || w->shape[1] != tiles || w->shape[2] != C || w->shape[3] != AK_NR)
      return ak_fail(&c, "ValueError", "a rank-4 w is the Winograd F(4x4, 3x3) form: it must be "
                     "[36, %lld, %lld, %d] for %lld input and %lld output channels", (long long)tiles,
                     (long long)C, AK_NR, (long long)C, (long long)cout);
    AK_TRY(ak_aligned(&c, w, "Winograd w"));
    kh = kw = 3;
  } else {
    return ak_fail(&c, "ValueError", "w must be packed (rank 6), Winograd-transformed (rank 4) "
                   "or depthwise [KH, KW, C] (rank 3), not rank %d", (int)w->ndim);
  }
  if (w->ndim == 4 && (groups != 1 || v[0] != 1 || v[1] != 1 || v[4] != 1 || v[5] != 1))
    return ak_fail(&c, "ValueError", "the Winograd form is for ungrouped, stride-1, undilated "
                   "3x3 convolutions (got groups=%lld, strides %lldx%lld, dilations %lldx%lld)",
                   (long long)groups, (long long)v[0], (long long)v[1], (long long)v[4],
                   (long long)v[5]);
  if (kh < 1 || kw < 1)
    return ak_fail(&c, "ValueError", "the kernel window must be at least 1x1");
  if (out->shape[0] != N)
    return ak_fail(&c, "ValueError", "out must be [%lld, OH, OW, Cout]", (long long)N);
  if (ak_numel(bias) != 0 && ak_numel(bias) != cout)
    return ak_fail(&c, "ValueError", "bias must have %lld elements", (long long)cout);
  if (e.res_mode != AK_RES_NONE) AK_TRY(ak_same_shape(&c, res, out, "res", "out"));
  ak_conv_geom g = {C / groups, x->shape[1], x->shape[2], kh, kw,
                    out->shape[1], out->shape[2], v[0], v[1], v[2], v[3], v[4], v[5]};
  if (ak_numel(out) == 0) return 0;
  const float* b = AK_OPT(bias);
  const float* r = e.res_mode ? AK_DATA(res) : NULL;
  if (depthwise)
    ak_depthwise_nhwc_f32(AK_DATA(x), AK_DATA(w), b, r, AK_DATA(out), N, C, &g, e, tune.threads);
  else if (w->ndim == 4)
    ak_conv2d_nhwc_wino_f32(AK_DATA(x), AK_DATA(w), b, r, AK_DATA(out), N, &g, cout, e, tune);
  else
    ak_conv2d_nhwc_f32(AK_DATA(x), AK_DATA(w), b, r, AK_DATA(out), N, groups, &g, cout, e, tune);
  return 0;
}

/* conv2d_nhwc_i8(x[N, H, W, C] f32 | u8, wq int8 [P, K4, NR, 4], qp[2, P*NR],
 *               act_qparams[0 | 2 | 4], bias[Cout] | [0], res | [0], KH, KW, SH, SW, PH, PW, DH,
 *               DW, act, res_mode, lo, hi, scale, out[N, OH, OW, Cout] f32 | u8):
 *               ak_conv2d_nhwc_u8s8_f32 (groups 1), K = KH*KW*C. */
static int ak_conv2d_nhwc_i8(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.conv2d_nhwc_i8", args, n};
  AK_TRY(ak_nargs(&c, 20, "x, w_int8, w_qparams, act_qparams, bias, res, KH, KW, SH, SW, PH, PW, "
                          "DH, DW, act, res_mode, lo, hi, scale, out"));
  DLTensor *x, *w, *qp, *aqp, *bias, *res, *out;
  AK_NEED(x = ak_f32_or_u8(&c, 0, "x", 4, 4));
  AK_NEED(w = ak_typed(&c, 1, "w_int8", 4, 4, kDLInt, 8, "int8"));
  AK_NEED(qp = ak_f32(&c, 2, "w_qparams", 2, 2));
  AK_NEED(aqp = ak_f32(&c, 3, "act_qparams", 1, 1));
  AK_NEED(bias = ak_f32(&c, 4, "bias", 1, 1));
  AK_NEED(res = ak_f32(&c, 5, "res", 1, 4));
  AK_NEED(out = ak_f32_or_u8(&c, n - 1, "out", 4, 4));
  ak_tuning tune;
  const float *xq, *yq;
  AK_TRY(ak_config(&c, 20, &tune));
  int64_t v[8];
  static const char* names[8] = {"KH", "KW", "stride_h", "stride_w", "pad_top", "pad_left",
                                 "dilation_h", "dilation_w"};
  for (int i = 0; i < 8; ++i)
    AK_TRY(ak_int(&c, 6 + i, names[i], (i == 4 || i == 5) ? 0 : 1, 1 << 20, &v[i]));
  ak_epilogue e;
  AK_TRY(ak_epi(&c, 14, &e));
  AK_TRY(ak_act_qparams(&c, aqp, x, out, &e, &xq, &yq));
  AK_TRY(ak_aligned(&c, w, "w_int8"));
  const int64_t N = x->shape[0], C = x->shape[3], cout = out->shape[3];
  AK_TRY(ak_int8_weights(&c, w, qp, v[0] * v[1] * C, cout,
                         "a %lldx%lld window over %lld channels and %lld outputs", (long long)v[0],
                         (long long)v[1], (long long)C, (long long)cout));
  if (out->shape[0] != N)
    return ak_fail(&c, "ValueError", "out must be [%lld, OH, OW, Cout]", (long long)N);
  if (ak_numel(bias) != 0 && ak_numel(bias) != cout)
    return ak_fail(&c, "ValueError", "bias must have %lld elements", (long long)cout);
  if (e.res_mode != AK_RES_NONE) AK_TRY(ak_same_shape(&c, res, out, "res", "out"));
  ak_conv_geom g = {C, x->shape[1], x->shape[2], v[0], v[1], out->shape[1], out->shape[2],
                    v[2], v[3], v[4], v[5], v[6], v[7]};
  if (ak_numel(out) == 0) return 0;
  if (ak_conv2d_nhwc_u8s8_f32(AK_DATA(x), x->dtype.code == kDLUInt,
                              (const int8_t*)((char*)w->data + w->byte_offset), AK_DATA(qp), xq, yq,
                              AK_OPT(bias), e.res_mode ? AK_DATA(res) : NULL, AK_DATA(out), N, &g,
                              cout, e, tune) != 0)
    return ak_fail(&c, "MemoryError", "could not allocate %lld bytes for the quantized input",
                   (long long)ak_numel(x));
  return 0;
}

/* copy(src, dst): dst's bytes become src's (same dtype and shape, both contiguous CPU tensors),
 * in 64 KB chunks over the pool's threads. The runner stages a caller's input this way: a copy
 * from memory or L3 runs at about 12 GB/s on one core here, and the input of an image model is
 * 0.6 MB (MobileNetV2, between runs: 48 -> 32 us). */
typedef struct {
  char* dst;
  const char* src;
  int64_t bytes;
} ak_copy_job;

#define AK_COPY_CHUNK (64 * 1024)

static void copy_range(int64_t begin, int64_t end, void* ctx) {
  const ak_copy_job* j = (const ak_copy_job*)ctx;
  const int64_t b = begin * AK_COPY_CHUNK, e = end * AK_COPY_CHUNK < j->bytes ? end * AK_COPY_CHUNK : j->bytes;
  memcpy(j->dst + b, j->src + b, (size_t)(e - b));
}

static int ak_copy(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.copy", args, n};
  AK_TRY(ak_nargs(&c, 2, "src, dst"));
  DLTensor *src, *dst;
  AK_NEED(src = ak_typed(&c, 0, "src", 0, 16, -1, 0, "any"));
  AK_NEED(dst = ak_typed(&c, n - 1, "dst", 0, 16, -1, 0, "any"));
  ak_tuning tune;
  AK_TRY(ak_config(&c, 2, &tune));
  if (src->dtype.code != dst->dtype.code || src->dtype.bits != dst->dtype.bits ||
      src->dtype.lanes != dst->dtype.lanes)
    return ak_fail(&c, "TypeError", "dst must have src's dtype (code %d, %d bits, %d lanes)",
                   (int)src->dtype.code, (int)src->dtype.bits, (int)src->dtype.lanes);
  AK_TRY(ak_same_shape(&c, dst, src, "dst", "src"));
  const int64_t bytes = ak_numel(src) * ((src->dtype.bits * src->dtype.lanes + 7) / 8);
  if (bytes == 0) return 0;
  ak_copy_job j = {(char*)dst->data + dst->byte_offset, (const char*)src->data + src->byte_offset,
                   bytes};
  ak_parallel_range_n(copy_range, &j, (bytes + AK_COPY_CHUNK - 1) / AK_COPY_CHUNK, tune.threads);
  return 0;
}

/* set_model_bytes(bytes): the size of the model the calling thread runs next (see
 * ak_set_model_bytes); the runner calls it before each run. */
static int ak_model_bytes(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.set_model_bytes", args, n};
  if (n != 1) return ak_fail(&c, "TypeError", "expected 1 argument (bytes), got %d", (int)n);
  int64_t bytes;
  AK_TRY(ak_int(&c, 0, "bytes", 0, INT64_MAX, &bytes));
  ak_set_model_bytes(bytes);
  return 0;
}

/* layer_norm(x[..., D], gamma[D], beta[D] | [0], eps, out) (center = 1) and
 * rms_norm(x[..., D], gamma[D], eps, out) = x / sqrt(mean(x^2) + eps) * gamma (center = 0), over
 * the last axis. */
static int ak_norm(const ak_call* c, int center) {
  const int nargs = center ? 5 : 4, i_eps = nargs - 2;
  AK_TRY(ak_nargs(c, nargs, center ? "x, gamma, beta, eps, out" : "x, gamma, eps, out"));
  DLTensor *x, *gamma, *beta = NULL, *out;
  AK_NEED(x = ak_f32(c, 0, "x", 1, 8));
  AK_NEED(gamma = ak_f32(c, 1, "gamma", 1, 1));
  if (center) AK_NEED(beta = ak_f32(c, 2, "beta", 1, 1));
  AK_NEED(out = ak_f32(c, c->num_args - 1, "out", 1, 8));
  float eps;
  AK_TRY(ak_float(c, i_eps, "eps", &eps));
  ak_tuning tune;
  AK_TRY(ak_config(c, nargs, &tune));
  AK_TRY(ak_same_shape(c, out, x, "out", "x"));
  const int64_t D = x->shape[x->ndim - 1];
  if (center && (ak_numel(gamma) != D || (ak_numel(beta) != 0 && ak_numel(beta) != D)))
    return ak_fail(c, "ValueError", "gamma/beta must have D=%lld elements", (long long)D);
  if (!center && ak_numel(gamma) != D)
    return ak_fail(c, "ValueError", "gamma must have D=%lld elements, got %lld", (long long)D,
                   (long long)ak_numel(gamma));
  if (D == 0) return 0;
  if (center)
    ak_layer_norm_f32(AK_DATA(x), AK_DATA(gamma), AK_OPT(beta), AK_DATA(out), ak_numel(x) / D, D,
                      eps, tune.threads);
  else
    ak_rms_norm_f32(AK_DATA(x), AK_DATA(gamma), AK_DATA(out), ak_numel(x) / D, D, eps, tune.threads);
  return 0;
}

static int ak_layer_norm(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.layer_norm", args, n};
  return ak_norm(&c, 1);
}

static int ak_rms_norm(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.rms_norm", args, n};
  return ak_norm(&c, 0);
}

/* softmax(x[..., D], out) over the last axis. */
static int ak_softmax(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.softmax", args, n};
  AK_TRY(ak_nargs(&c, 2, "x, out"));
  DLTensor *x, *out;
  AK_NEED(x = ak_f32(&c, 0, "x", 1, 8));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 1, 8));
  ak_tuning tune;
  AK_TRY(ak_config(&c, 2, &tune));
  AK_TRY(ak_same_shape(&c, out, x, "out", "x"));
  const int64_t D = x->shape[x->ndim - 1];
  if (D == 0) return 0;
  ak_softmax_f32(AK_DATA(x), AK_DATA(out), ak_numel(x) / D, D, tune.threads);
  return 0;
}

/* attention(q[B, S, H, D], k[B, Sk, H, D], v[B, Sk, H, Dv], mask | [0], scale, out[B, S, H, Dv]):
 * out[b, s, h] = softmax(scale * q[b, s, h] . k[b, :, h] + mask[b, h, s]) @ v[b, :, h], the
 * heads as the projections lay them out; mask broadcasts (numpy) to the scores [B, H, S, Sk]. */
static int ak_attention_call(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  ak_call c = {"accelkit.cpu.attention", args, n};
  AK_TRY(ak_nargs(&c, 6, "q, k, v, mask, scale, out"));
  DLTensor *q, *k, *v, *mask, *out;
  AK_NEED(q = ak_f32(&c, 0, "q", 4, 4));
  AK_NEED(k = ak_f32(&c, 1, "k", 4, 4));
  AK_NEED(v = ak_f32(&c, 2, "v", 4, 4));
  AK_NEED(mask = ak_f32(&c, 3, "mask", 1, 4));
  AK_NEED(out = ak_f32(&c, n - 1, "out", 4, 4));
  ak_tuning tune;
  AK_TRY(ak_config(&c, 6, &tune));
  ak_attention a;
  memset(&a, 0, sizeof(a));
  AK_TRY(ak_float(&c, 4, "scale", &a.scale));
  a.B = q->shape[0]; a.S = q->shape[1]; a.H = q->shape[2]; a.D = q->shape[3];
  a.Sk = k->shape[1]; a.Dv = v->shape[3];
  if (k->shape[0] != a.B || k->shape[2] != a.H || k->shape[3] != a.D)
    return ak_fail(&c, "ValueError", "k must be [B=%lld, Sk, H=%lld, D=%lld] like q, got [%lld, "
                   "%lld, %lld, %lld]", (long long)a.B, (long long)a.H, (long long)a.D,
                   (long long)k->shape[0], (long long)k->shape[1], (long long)k->shape[2],
                   (long long)k->shape[3]);
  if (v->shape[0] != a.B || v->shape[1] != a.Sk || v->shape[2] != a.H)
    return ak_fail(&c, "ValueError", "v must be [B=%lld, Sk=%lld, H=%lld, Dv], got [%lld, %lld, "
                   "%lld, %lld]", (long long)a.B, (long long)a.Sk, (long long)a.H,
                   (long long)v->shape[0], (long long)v->shape[1], (long long)v->shape[2],
                   (long long)v->shape[3]);
  if (out->shape[0] != a.B || out->shape[1] != a.S || out->shape[2] != a.H || out->shape[3] != a.Dv)
    return ak_fail(&c, "ValueError", "out must be [B, S, H, Dv] = [%lld, %lld, %lld, %lld]",
                   (long long)a.B, (long long)a.S, (long long)a.H, (long long)a.Dv);
  if (a.D == 0 && a.Sk > 0)
    return ak_fail(&c, "ValueError", "q and k have head size D=0 (no scores to compute)");
  if (!(mask->ndim == 1 && mask->shape[0] == 0)) { /* numpy broadcast to [B, H, S, Sk], last dim Sk */
    const int64_t target[4] = {a.B, a.H, a.S, a.Sk};
    int64_t stride[4] = {0, 0, 0, 0}, step = 1;
    int ok = mask->shape[mask->ndim - 1] == a.Sk;
    for (int d = 3; ok && d >= 0; --d) {
      const int md = d - (4 - mask->ndim);
      const int64_t size = md >= 0 ? mask->shape[md] : 1;
      ok = size == target[d] || size == 1;
      stride[d] = size == 1 ? 0 : step;
      step *= size;
    }
    if (!ok)
      return ak_fail(&c, "ValueError", "mask must broadcast to the scores [B, H, S, Sk] = [%lld, "
                     "%lld, %lld, %lld] with its last dim Sk", (long long)a.B, (long long)a.H,
                     (long long)a.S, (long long)a.Sk);
    a.mask = AK_DATA(mask);
    a.m_sb = stride[0]; a.m_sh = stride[1]; a.m_sr = stride[2];
  }
  a.q = AK_DATA(q); a.k = AK_DATA(k); a.v = AK_DATA(v); a.out = AK_DATA(out);
  /* out is written while q, k, v and mask are still being read: no overlap */
  const DLTensor* ins[4] = {q, k, v, mask};
  const char* names[4] = {"q", "k", "v", "mask"};
  const char *o0 = (const char*)a.out, *o1 = o0 + ak_numel(out) * (int64_t)sizeof(float);
  for (int i = 0; i < 4; ++i) {
    const char* i0 = (const char*)AK_DATA(ins[i]);
    const char* i1 = i0 + ak_numel(ins[i]) * (int64_t)sizeof(float);
    if (o0 < o1 && i0 < i1 && i0 < o1 && o0 < i1)
      return ak_fail(&c, "ValueError", "out overlaps %s: attention cannot run in place", names[i]);
  }
  ak_attention_f32(&a, tune.threads);
  return 0;
}

/* The registered entry points: each kernel under the denormal mode of ak_kernels.h. */
#define AK_DENORMALS_OFF(fn)                                                           \
  static int fn##_entry(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) { \
    const unsigned mode = ak_denormals_off();                                          \
    const int rc = fn(self, args, n, result);                                          \
    ak_denormals_restore(mode);                                                        \
    return rc;                                                                         \
  }
AK_DENORMALS_OFF(ak_dense)
AK_DENORMALS_OFF(ak_dense_i8)
AK_DENORMALS_OFF(ak_dense_w16)
AK_DENORMALS_OFF(ak_bmm)
AK_DENORMALS_OFF(ak_conv2d)
AK_DENORMALS_OFF(ak_conv2d_nhwc)
AK_DENORMALS_OFF(ak_conv2d_nhwc_i8)
AK_DENORMALS_OFF(ak_layer_norm)
AK_DENORMALS_OFF(ak_rms_norm)
AK_DENORMALS_OFF(ak_softmax)
AK_DENORMALS_OFF(ak_attention_call)
AK_DENORMALS_OFF(ak_copy)
#undef AK_DENORMALS_OFF

static int ak_register_one(const char* name, TVMFFISafeCallType fn) {
  TVMFFIObjectHandle f = NULL;
  if (TVMFFIFunctionCreate(NULL, fn, NULL, &f) != 0) return -1;
  TVMFFIByteArray nm = {name, strlen(name)};
  int rc = TVMFFIFunctionSetGlobal(&nm, f, /*allow_override=*/1);
  TVMFFIObjectDecRef(f); /* the registry holds its own reference */
  return rc;
}

/* Registers every kernel; returns the number registered, or -1. */
int ak_register_all(void) {
  static const struct { const char* name; TVMFFISafeCallType fn; } table[] = {
      {"accelkit.cpu.dense", ak_dense_entry},
      {"accelkit.cpu.dense_i8", ak_dense_i8_entry},
      {"accelkit.cpu.dense_w16", ak_dense_w16_entry},
      {"accelkit.cpu.bmm", ak_bmm_entry},
      {"accelkit.cpu.conv2d", ak_conv2d_entry},
      {"accelkit.cpu.conv2d_nhwc", ak_conv2d_nhwc_entry},
      {"accelkit.cpu.conv2d_nhwc_i8", ak_conv2d_nhwc_i8_entry},
      {"accelkit.cpu.layer_norm", ak_layer_norm_entry},
      {"accelkit.cpu.rms_norm", ak_rms_norm_entry},
      {"accelkit.cpu.softmax", ak_softmax_entry},
      {"accelkit.cpu.attention", ak_attention_call_entry},
      {"accelkit.cpu.copy", ak_copy_entry},
      {"accelkit.cpu.set_model_bytes", ak_model_bytes},
  };
  const char* portable = getenv("ACCELKIT_PORTABLE_KERNELS");
  ak_force_portable = portable != NULL && portable[0] != '\0' && strcmp(portable, "0") != 0;
  /* the most the dispatch may use (accelkit.kernels checks the value and names the choices) */
  const char* cap = getenv("ACCELKIT_KERNEL_ISA");
  ak_isa_cap = cap && strcmp(cap, "portable") == 0 ? AK_ISA_PORTABLE
               : cap && strcmp(cap, "avx2") == 0   ? AK_ISA_AVX2
                                                   : AK_ISA_AVX512;
  for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); ++i)
    if (ak_register_one(table[i].name, table[i].fn)) return -1;
  return (int)(sizeof(table) / sizeof(table[0]));
}
