/* TVM-FFI glue: destination-passing safe_call wrappers that check every tensor (dtype, rank,
 * shape, device, contiguity) before touching memory, and register them as global functions
 * `accelkit.cpu.<kernel>` callable from R.call_dps_packed. The only file that sees TVM headers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>
#include "ak_kernels.h"

extern int ak_force_portable;

static DLTensor* ak_arg_tensor(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) /* object layout: {TVMFFIObject header, DLTensor, ...} */
    return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return NULL;
}

static int ak_fail(const char* kind, const char* kernel, const char* fmt, const char* what,
                   long long a, long long b) {
  char msg[512];
  char detail[384];
  snprintf(detail, sizeof(detail), fmt, what, a, b);
  snprintf(msg, sizeof(msg), "accelkit kernel %s: %s", kernel, detail);
  TVMFFIErrorSetRaisedFromCStr(kind, msg);
  return -1;
}

/* 0 if t is a contiguous float32 CPU tensor of rank ndim, else raises and returns -1. */
static int ak_check_f32(const char* kernel, const char* what, const DLTensor* t, int ndim) {
  if (t->device.device_type != kDLCPU)
    return ak_fail("ValueError", kernel, "%s must be on the CPU (device type %lld)", what,
                   (long long)t->device.device_type, 0);
  if (t->dtype.code != kDLFloat || t->dtype.bits != 32 || t->dtype.lanes != 1)
    return ak_fail("TypeError", kernel, "%s must be float32 (got dtype code %lld, %lld bits)",
                   what, t->dtype.code, t->dtype.bits);
  if (t->ndim != ndim)
    return ak_fail("ValueError", kernel, "%s must have rank %lld (got %lld)", what, ndim,
                   t->ndim);
  if (t->data == NULL)
    return ak_fail("ValueError", kernel, "%s has no data%s", what, 0, 0);
  if (t->strides) {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (t->shape[i] != 1 && t->strides[i] != expect)
        return ak_fail("ValueError", kernel, "%s must be contiguous (dim %lld has stride %lld)",
                       what, i, t->strides[i]);
      expect *= t->shape[i];
    }
  }
  return 0;
}

#define AK_DATA(t) ((float*)((char*)(t)->data + (t)->byte_offset))

/* (x[M,K], w[K,N], bias[N], out[M,N]) */
static int ak_dense_bias_generic(const char* kernel, ak_activation act, const TVMFFIAny* args,
                                 int32_t num_args) {
  if (num_args != 4)
    return ak_fail("TypeError", kernel, "%s: expected 4 arguments (x, w, bias, out), got %lld",
                   "call", num_args, 0);
  DLTensor* t[4];
  static const char* names[4] = {"x", "w", "bias", "out"};
  static const int ranks[4] = {2, 2, 1, 2};
  for (int i = 0; i < 4; ++i) {
    t[i] = ak_arg_tensor(&args[i]);
    if (!t[i])
      return ak_fail("TypeError", kernel, "argument %s must be a tensor (type index %lld)",
                     names[i], args[i].type_index, 0);
    if (ak_check_f32(kernel, names[i], t[i], ranks[i])) return -1;
  }
  const int64_t M = t[0]->shape[0], K = t[0]->shape[1], N = t[1]->shape[1];
  if (t[1]->shape[0] != K)
    return ak_fail("ValueError", kernel, "%s: x has K=%lld but w has %lld rows", "shape", K,
                   t[1]->shape[0]);
  if (t[2]->shape[0] != N)
    return ak_fail("ValueError", kernel, "%s: bias has %lld elements, expected N=%lld", "shape",
                   t[2]->shape[0], N);
  if (t[3]->shape[0] != M || t[3]->shape[1] != N)
    return ak_fail("ValueError", kernel, "%s: out must be [%lld, %lld]", "shape", M, N);
  ak_dense_f32(AK_DATA(t[0]), AK_DATA(t[1]), AK_DATA(t[2]), AK_DATA(t[3]), M, N, K, act);
  return 0;
}

static int ak_dense_bias(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  return ak_dense_bias_generic("accelkit.cpu.dense_bias", AK_ACT_NONE, args, n);
}

static int ak_dense_bias_relu(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self; (void)result;
  return ak_dense_bias_generic("accelkit.cpu.dense_bias_relu", AK_ACT_RELU, args, n);
}

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
  const char* portable = getenv("ACCELKIT_PORTABLE_KERNELS");
  ak_force_portable = portable != NULL && portable[0] != '\0' && strcmp(portable, "0") != 0;
  if (ak_register_one("accelkit.cpu.dense_bias", ak_dense_bias)) return -1;
  if (ak_register_one("accelkit.cpu.dense_bias_relu", ak_dense_bias_relu)) return -1;
  return 2;
}
