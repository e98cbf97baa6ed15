/* GEMM driver (panel packing, work split, ISA dispatch), convolution and row kernels on top of
 * it, and the process's one parallel-for (TVM's thread pool when registered). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "ak_kernels.h"

int ak_force_portable = 0;
int ak_isa_cap = AK_ISA_AVX512;

/* ---- ISA dispatch ------------------------------------------------------------------------ */

int ak_isa(void) {
  if (ak_force_portable) return AK_ISA_PORTABLE;
  __builtin_cpu_init();
  const int cpu = __builtin_cpu_supports("avx512f") ? AK_ISA_AVX512
                  : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? AK_ISA_AVX2
                                                                                     : AK_ISA_PORTABLE;
  return cpu < ak_isa_cap ? cpu : ak_isa_cap;
}

const ak_isa_table* ak_table(void) {
  switch (ak_isa()) {
    case AK_ISA_AVX512: return &ak_avx512_table;
    case AK_ISA_AVX2: return &ak_avx2_table;
    default: return &ak_portable_table;
  }
}

/* ---- threads ----------------------------------------------------------------------------- */

static ak_parallel_launch_fn g_launch = NULL;
static int g_threads = 1;

void ak_set_parallel_launch(ak_parallel_launch_fn fn, int num_threads) {
  g_launch = fn;
  g_threads = num_threads > 0 ? num_threads : 1;
}

int ak_num_threads(void) { return g_launch ? g_threads : 1; }

typedef struct {
  void (*body)(int64_t, int64_t, void*);
  void* ctx;
  int64_t n;
} ak_range_job;

static int ak_range_lambda(int task_id, ak_parallel_env* env, void* cdata) {
  const ak_range_job* job = (const ak_range_job*)cdata;
  const int64_t nt = env->num_task > 0 ? env->num_task : 1;
  const int64_t begin = job->n * task_id / nt, end = job->n * (task_id + 1) / nt;
  if (begin < end) {
    const unsigned mode = ak_denormals_off(); /* a pool thread's mode is its own */
    job->body(begin, end, job->ctx);
    ak_denormals_restore(mode);
  }
  return 0;
}

void ak_parallel_range(void (*body)(int64_t, int64_t, void*), void* ctx, int64_t n) {
  ak_parallel_range_n(body, ctx, n, 0);
}

void ak_parallel_range_n(void (*body)(int64_t, int64_t, void*), void* ctx, int64_t n,
                         int want) {
  if (n <= 0) return;
  const int pool = ak_num_threads();
  const int threads = want > 0 && want < pool ? want : pool;
  if (threads <= 1 || n == 1) {
    body(0, n, ctx);
    return;
  }
  ak_range_job job = {body, ctx, n};
  g_launch(ak_range_lambda, &job, (int)(threads < n ? threads : n));
}

/* A per-thread scratch buffer (64-byte aligned), grown on demand, kept for the thread's life. */
static float* ak_scratch(size_t floats) {
  static __thread float* buf = NULL;
  static __thread size_t cap = 0;
  if (floats > cap) {
    free(buf);
    size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
    buf = (float*)aligned_alloc(64, bytes);
    cap = buf ? bytes / sizeof(float) : 0;
  }
  return buf;
}

/* The row count of each micro-kernel call over `rows` rows, at most `step`, as equal as the
 * calls allow: 49 rows in calls of at most 8 are 7 x 7, not 6 x 8 + 1 (a 1-row call streams
 * the whole panel for one row). */
static inline int64_t even_rows(int64_t rows, int64_t step) {
  const int64_t calls = (rows + step - 1) / step;
  return calls > 0 ? (rows + calls - 1) / calls : step;
}

/* Weight prefetch: a micro-kernel call with epi.pf set also prefetches into L2 one line per k
 * step from pf (the AVX-512 one; the others ignore it). The drivers with packed weights (dense,
 * NHWC conv, Winograd) point the first two calls over a weight slice of kb x NR floats (2 kb
 * lines) at the two halves of the slice the thread takes next, so a slice that comes from memory
 * streams in while the current one computes; otherwise the first call over each slice waits on
 * memory (about 10 GB/s per core here). Whole models do not keep their weights in cache between
 * runs: same process, ResNet-50 1.14x, BERT-base 1.08x, all-MiniLM-L6-v2 1.08x, MLP 1.06x.
 * A prefetch past the end of the weights (a short last K block) is harmless: it never faults. */
static inline const char* slice_prefetch(const float* next, int64_t part, int64_t kb) {
  return next && part < 2 ? (const char*)next + part * kb * 64 : NULL;
}

/* ---- packing ----------------------------------------------------------------------------- */

void ak_pack_b_f32(const float* b, int64_t K, int64_t N, int transposed, float* dst) {
  const int64_t P = (N + AK_NR - 1) / AK_NR;
  for (int64_t p = 0; p < P; ++p) {
    float* d = dst + p * K * AK_NR;
    const int64_t n0 = p * AK_NR, nv = N - n0 < AK_NR ? N - n0 : AK_NR;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < nv; ++j)
        d[k * AK_NR + j] = transposed ? b[(n0 + j) * K + k] : b[k * N + n0 + j];
      for (int64_t j = nv; j < AK_NR; ++j) d[k * AK_NR + j] = 0.f;
    }
  }
}

/* One panel of a row-major B: dst[k][j] = src[k * ld + j] for j < nv, zeros up to AK_NR. */
static void pack_panel(const float* src, int64_t ld, int64_t K, int64_t nv, float* dst) {
  if (nv == AK_NR) {
    for (int64_t k = 0; k < K; ++k) {
      const float* s = src + k * ld;
      float* d = dst + k * AK_NR;
#pragma GCC unroll 32
      for (int j = 0; j < AK_NR; ++j) d[j] = s[j];
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    float* d = dst + k * AK_NR;
    memcpy(d, src + k * ld, (size_t)nv * sizeof(float));
    memset(d + nv, 0, (size_t)(AK_NR - nv) * sizeof(float));
  }
}

static void pack_rowmajor(const ak_gemm* g, int64_t bi, int64_t n0, float* dst) {
  pack_panel(g->b + bi * g->b_bstride + n0, g->ldb, g->K, g->N - n0 < AK_NR ? g->N - n0 : AK_NR, dst);
}

/* im2col straight into a panel: B[(c, ky, kx)][(oy, ox)] = x[c, oy*SH-PH+ky*DH, ox*SW-PW+kx*DW].
 * The panel's columns split into runs within one output row; each run reads one input row, so
 * it is a zero head, a (strided) copy and a zero tail: no per-element bounds checks. */
/* Runs are short (<= NR floats): inline loops, not libc calls (gcc would turn them back into
 * memcpy/memset calls without the attribute, which cost more than the copy at this size). */
#define AK_SHORT_COPIES __attribute__((optimize("no-tree-loop-distribute-patterns")))

int ak_im2col_runs(const ak_conv_geom* cg, int64_t n0, int64_t nv, ak_im2col_run runs[AK_NR]) {
  int count = 0;
  for (int64_t j = 0, oy = n0 / cg->OW, ox = n0 % cg->OW; j < nv; ++count, ox = 0, ++oy) {
    const int64_t len = cg->OW - ox < nv - j ? cg->OW - ox : nv - j;
    runs[count] = (ak_im2col_run){j, len, oy, ox};
    j += len;
  }
  return count;
}

AK_SHORT_COPIES void ak_im2col_portable(const ak_conv_geom* cg, const float* x, int64_t n0,
                                        int64_t nv, float* dst) {
  ak_im2col_run run[AK_NR];
  const int runs = ak_im2col_runs(cg, n0, nv, run);
  for (int64_t c = 0; c < cg->C; ++c) {
    const float* xc = x + c * cg->H * cg->W;
    for (int64_t ky = 0; ky < cg->KH; ++ky) {
      for (int64_t kx = 0; kx < cg->KW; ++kx) {
        float* d = dst + ((c * cg->KH + ky) * cg->KW + kx) * AK_NR;
        for (int r = 0; r < runs; ++r) {
          float* dd = d + run[r].j;
          const int64_t len = run[r].len;
          const int64_t iy = run[r].oy * cg->SH - cg->PH + ky * cg->DH;
          if (iy < 0 || iy >= cg->H) {
            for (int64_t t = 0; t < len; ++t) dd[t] = 0.f;
            continue;
          }
          const int64_t ix0 = run[r].ox * cg->SW - cg->PW + kx * cg->DW;
          int64_t lo, hi; /* the valid t: 0 <= ix0 + t*SW < W (no divisions for SW = 1, 2) */
          if (cg->SW == 1) {
            lo = ix0 < 0 ? -ix0 : 0;
            hi = cg->W - ix0;
          } else if (cg->SW == 2) {
            lo = ix0 < 0 ? (1 - ix0) >> 1 : 0;
            hi = ix0 > cg->W - 1 ? 0 : ((cg->W - 1 - ix0) >> 1) + 1;
          } else {
            lo = ix0 < 0 ? (-ix0 + cg->SW - 1) / cg->SW : 0;
            hi = ix0 > cg->W - 1 ? 0 : (cg->W - 1 - ix0) / cg->SW + 1;
          }
          if (lo > len) lo = len;
          if (hi > len) hi = len;
          if (hi < lo) hi = lo;
          const float* src = xc + iy * cg->W + ix0;
          for (int64_t t = 0; t < lo; ++t) dd[t] = 0.f;
          if (cg->SW == 1) for (int64_t t = lo; t < hi; ++t) dd[t] = src[t];
          else for (int64_t t = lo; t < hi; ++t) dd[t] = src[t * cg->SW];
          for (int64_t t = hi; t < len; ++t) dd[t] = 0.f;
        }
        for (int64_t j = nv; j < AK_NR; ++j) d[j] = 0.f;
      }
    }
  }
}

static void pack_im2col(const ak_gemm* g, int64_t bi, int64_t n0, float* dst) {
  const int64_t nv = g->N - n0 < AK_NR ? g->N - n0 : AK_NR;
  ak_table()->im2col(g->conv, g->b + bi * g->b_bstride, n0, nv, dst);
}

/* ---- GEMM -------------------------------------------------------------------------------- */

typedef struct {
  const ak_gemm* g;
  ak_pack_fn pack;
  ak_ukr_fn ukr;
  int64_t P, mchunks, mrows;
  int panels_inner; /* idx -> (batch, m chunk, panel) instead of (batch, panel, m chunk) */
  int rows;         /* rows per micro-kernel call with a row-major A (the ISA's) */
  int64_t kc;       /* K block */
  int kouter;       /* K blocks outer (see gemm_range) */
} ak_gemm_job;

/* work item idx -> (row chunk, panel, batch item) */
static inline void gemm_item(const ak_gemm_job* job, int64_t idx, int64_t* mc, int64_t* p,
                             int64_t* bi) {
  if (job->panels_inner) {
    *p = idx % job->P;
    *mc = (idx / job->P) % job->mchunks;
    *bi = idx / (job->P * job->mchunks);
  } else {
    *mc = idx % job->mchunks;
    *p = (idx / job->mchunks) % job->P;
    *bi = idx / (job->mchunks * job->P);
  }
}

/* The row tiles [m_begin, m_end) of batch item bi against K block [k0, k0 + kb) of the panel
 * at column n0 (panel_k: that block's kb x NR slice); the first two calls prefetch `next`. The
 * partial sums of K blocks go through C exactly (same fp32 sums, same order). */
static inline void panel_block(const ak_gemm_job* job, int64_t bi, int64_t n0, const float* panel_k,
                               int64_t k0, int64_t kb, int64_t m_begin, int64_t m_end,
                               const float* next) {
  const ak_gemm* g = job->g;
  const int nv = (int)(g->N - n0 < AK_NR ? g->N - n0 : AK_NR);
  const float* a = g->a + bi * g->a_bstride;
  float* c = g->c + bi * g->c_bstride + n0;
  const float* bias = g->bias ? g->bias + bi * g->bias_bstride : NULL;
  const float* res = g->res ? g->res + bi * g->r_bstride + n0 : NULL;
  ak_epilogue epi = g->epi;
  epi.accumulate = k0 > 0;
  epi.raw = k0 + kb < g->K;
  /* packed A comes in AK_MR-row micro-panels */
  const int64_t step = g->a_prepacked ? AK_MR : even_rows(m_end - m_begin, job->rows);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += step) {
    const int mr = (int)(m_end - m0 < step ? m_end - m0 : step);
    const float* at = g->a_prepacked ? a + (m0 / AK_MR) * g->K * AK_MR + k0 * AK_MR
                                     : a + m0 * g->lda + k0;
    epi.pf = slice_prefetch(next, (m0 - m_begin) / step, kb);
    job->ukr(mr, kb, at, g->a_prepacked ? 0 : g->lda, panel_k, c + m0 * g->ldc, g->ldc, nv,
             bias && g->epi.bias_mode == AK_BIAS_COL ? bias + n0 : NULL,
             bias && g->epi.bias_mode == AK_BIAS_ROW ? bias + m0 : NULL,
             res ? res + m0 * g->ldr : NULL, g->ldr, &epi);
  }
}

static void gemm_range(int64_t begin, int64_t end, void* ctx) {
  const ak_gemm_job* job = (const ak_gemm_job*)ctx;
  const ak_gemm* g = job->g;
  float* buf = NULL;
  int64_t packed = -1;
  if (job->kouter) {
    /* K blocks outer, the thread's panels inner: a kc-deep block of A (all rows) stays in L2
     * across the thread's panels, instead of all of A streaming once per panel */
    const int64_t kc = job->kc, slice = g->K * AK_NR;
    for (int64_t k0 = 0; k0 < g->K; k0 += kc) {
      const int64_t kb = g->K - k0 < kc ? g->K - k0 : kc;
      for (int64_t p = begin; p < end; ++p) {
        const float* next = p + 1 < end ? g->b + (p + 1) * slice + k0 * AK_NR
                            : k0 + kb < g->K ? g->b + begin * slice + (k0 + kb) * AK_NR
                                             : NULL;
        panel_block(job, 0, p * AK_NR, g->b + p * slice + k0 * AK_NR, k0, kb, 0, g->M, next);
      }
    }
    return;
  }
  for (int64_t idx = begin; idx < end; ++idx) {
    int64_t mc, p, bi;
    gemm_item(job, idx, &mc, &p, &bi);
    const int64_t bp = bi * job->P + p;
    const int64_t n0 = p * AK_NR;
    const float* panel;
    if (g->b_prepacked) {
      panel = g->b + bi * g->b_bstride + p * g->K * AK_NR;
    } else {
      if (!buf) buf = ak_scratch((size_t)g->K * AK_NR);
      if (!buf) return; /* out of memory: leave the output as is (caller checked sizes) */
      if (bp != packed) {
        job->pack(g, bi, n0, buf);
        packed = bp;
      }
      panel = buf;
    }
    const int64_t m_begin = mc * job->mrows;
    const int64_t m_end = m_begin + job->mrows < g->M ? m_begin + job->mrows : g->M;
    /* K blocks (tuned): the panel's kc x NR slice stays in L1 while every row tile of the chunk
     * runs over it */
    const int64_t kc = job->kc;
    /* packed weights: prefetch the slice this thread takes next (the next K block of this panel,
     * or the next item's panel at k = 0) */
    const float* next_item = NULL;
    if (g->b_prepacked && idx + 1 < end) {
      int64_t nmc, np, nb;
      gemm_item(job, idx + 1, &nmc, &np, &nb);
      next_item = g->b + nb * g->b_bstride + np * g->K * AK_NR;
    }
    for (int64_t k0 = 0; k0 < g->K; k0 += kc) {
      const int64_t kb = g->K - k0 < kc ? g->K - k0 : kc;
      const float* next = !g->b_prepacked ? NULL
                          : k0 + kb < g->K ? panel + (k0 + kb) * AK_NR : next_item;
      panel_block(job, bi, n0, panel + k0 * AK_NR, k0, kb, m_begin, m_end, next);
    }
  }
}

/* Work split of a dense layer (packed weights, one batch item) by where its weights come from.
 * The default splits the weight panels between the threads: each reads half the weights and
 * all rows of A. When the whole model's weights fit in the last-level cache (the runner tells
 * each run's calling thread the model's size), the threads split the rows instead: each reads
 * all the weights, from that cache, but only its own rows of A and C, which the thread that
 * ran the previous layer's rows wrote, so nothing crosses between the cores' L2 caches. Same
 * process: all-MiniLM-L6-v2 (90 MB) 1.03x, the MLP (6 MB) 1.01-1.02x; BERT-base (434 MB,
 * weights from memory) went 0.97-0.99x with it, so it keeps the panel split. */
static __thread int64_t t_model_bytes = 0;

void ak_set_model_bytes(int64_t bytes) { t_model_bytes = bytes; }

int ak_weights_cached(int64_t bytes) {
  static int64_t llc = -1;
  if (llc < 0) {
    const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    llc = v > 0 ? v : 0;
  }
  return bytes > 0 && bytes <= llc / 2;
}

static int weights_cached(void) { return ak_weights_cached(t_model_bytes); }

/* B-resident order: when a batch's whole B (packed) fits in L2 and A is the bigger operand (1x1
 * and small-image convolutions: many output channels, few pixels), pack every panel once into a
 * shared buffer, then give each thread whole m-tiles that sweep all panels: A is read once
 * instead of once per panel. */
#define AK_RESIDENT_B_BYTES (512 * 1024)

typedef struct {
  const ak_gemm_job* job;
  float* packed; /* [P][K][NR] */
  int64_t bi;
} ak_resident_job;

static void resident_pack_range(int64_t begin, int64_t end, void* ctx) {
  const ak_resident_job* r = (const ak_resident_job*)ctx;
  for (int64_t p = begin; p < end; ++p)
    r->job->pack(r->job->g, r->bi, p * AK_NR, r->packed + p * r->job->g->K * AK_NR);
}

static void resident_tile_range(int64_t begin, int64_t end, void* ctx) {
  const ak_resident_job* r = (const ak_resident_job*)ctx;
  const ak_gemm* g = r->job->g;
  const int64_t bi = r->bi;
  const float* a = g->a + bi * g->a_bstride;
  const float* bias = g->bias ? g->bias + bi * g->bias_bstride : NULL;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t m0 = t * AK_MR;
    const int mr = (int)(g->M - m0 < AK_MR ? g->M - m0 : AK_MR);
    const float* at = g->a_prepacked ? a + t * g->K * AK_MR : a + m0 * g->lda;
    for (int64_t p = 0; p < r->job->P; ++p) {
      const int64_t n0 = p * AK_NR;
      const int nv = (int)(g->N - n0 < AK_NR ? g->N - n0 : AK_NR);
      r->job->ukr(mr, g->K, at, g->a_prepacked ? 0 : g->lda, r->packed + p * g->K * AK_NR,
                  g->c + bi * g->c_bstride + m0 * g->ldc + n0, g->ldc, nv,
                  bias && g->epi.bias_mode == AK_BIAS_COL ? bias + n0 : NULL,
                  bias && g->epi.bias_mode == AK_BIAS_ROW ? bias + m0 : NULL,
                  g->res ? g->res + bi * g->r_bstride + m0 * g->ldr + n0 : NULL, g->ldr, &g->epi);
    }
  }
}

void ak_gemm_f32(const ak_gemm* g) {
  if (g->batch <= 0 || g->M <= 0 || g->N <= 0) return;
  ak_gemm_job job;
  job.g = g;
  job.pack = g->pack ? g->pack : pack_rowmajor;
  job.ukr = ak_table()->ukr;
  job.rows = ak_table()->rows;
  /* K block: tuned, or 512 for a long K against packed weights (BERT's 3072 -> 768 projection:
   * the panel slice stays in L2 while the row tiles run over it; 149 -> 163 GFLOP/s on AVX2) */
  job.kc = g->tune.kc > 0 ? g->tune.kc : (g->b_prepacked && g->K > 1024 ? 512 : g->K);
  if (job.kc <= 0 || job.kc > g->K) job.kc = g->K > 0 ? g->K : 1;
  job.P = (g->N + AK_NR - 1) / AK_NR;
  const int64_t mtiles = (g->M + AK_MR - 1) / AK_MR;
  const int pool = ak_num_threads();
  const int64_t threads = g->tune.threads > 0 && g->tune.threads < pool ? g->tune.threads : pool;
  const int64_t grain = g->tune.grain > 0 ? g->tune.grain : 4;
  const size_t b_bytes = (size_t)job.P * (size_t)g->K * AK_NR * sizeof(float);
  const int resident = g->tune.order == 2 ? b_bytes <= 8 * AK_RESIDENT_B_BYTES
                       : g->tune.order == 1 ? 0
                       : b_bytes <= AK_RESIDENT_B_BYTES && g->M >= g->N && mtiles >= 4 * threads &&
                             g->batch == 1; /* per batch item it costs two pool launches */
  if (!g->b_prepacked && resident) {
    float* packed = ak_scratch(b_bytes / sizeof(float)); /* the calling thread's */
    if (packed) {
      for (int64_t bi = 0; bi < g->batch; ++bi) {
        ak_resident_job r = {&job, packed, bi};
        ak_parallel_range_n(resident_pack_range, &r, job.P, (int)threads);
        ak_parallel_range_n(resident_tile_range, &r, mtiles, (int)threads);
      }
      return;
    }
  }
  /* panels inner only pays with packed weights (a per-call panel would be packed again) */
  job.panels_inner = g->b_prepacked && g->tune.loop == 1;
  const int64_t want = grain * threads, have = g->batch * job.P;
  int64_t chunks = have >= want ? 1 : (want + have - 1) / have;
  /* the running model's weights stay in the last-level cache between runs: split the rows
   * instead of the weight panels (see ak_set_model_bytes) */
  if (g->b_prepacked && g->batch == 1 && mtiles >= 4 * threads && !g->tune.grain &&
      !g->tune.loop && weights_cached()) {
    chunks = threads;
    job.panels_inner = 1;
  }
  if (chunks > mtiles) chunks = mtiles;
  job.mrows = ((mtiles + chunks - 1) / chunks) * AK_MR;
  job.mchunks = (g->M + job.mrows - 1) / job.mrows;
  /* untuned, K-blocked (K > 1024) with the weight panels split: K blocks outer (gemm_range).
   * BERT-base's 3072 -> 768 projections, whose A is 1.5 MB: the model 1.009-1.011x */
  job.kouter = g->b_prepacked && !g->a_prepacked && job.mchunks == 1 && g->batch == 1 &&
               job.kc < g->K && !job.panels_inner && !g->tune.kc && !g->tune.grain &&
               !g->tune.loop && !g->tune.order;
  ak_parallel_range_n(gemm_range, &job, g->batch * job.P * job.mchunks, (int)threads);
}

/* ---- convolution ------------------------------------------------------------------------- */

void ak_conv2d_f32(const float* x, const float* w, int w_packed, const float* bias,
                   const float* res, float* out, int64_t n, int64_t groups,
                   const ak_conv_geom* cg, int64_t cout, ak_epilogue epi, ak_tuning tune) {
  const int64_t coutg = cout / groups, K = cg->C * cg->KH * cg->KW, N = cg->OH * cg->OW;
  const int pointwise = cg->KH == 1 && cg->KW == 1 && cg->SH == 1 && cg->SW == 1 &&
                        cg->PH == 0 && cg->PW == 0 && cg->OH == cg->H && cg->OW == cg->W;
  epi.bias_mode = bias ? AK_BIAS_ROW : AK_BIAS_NONE;
  if (groups == 1 && n > 1) { /* every image in one GEMM batch (shared weights): one launch */
    ak_gemm g;
    memset(&g, 0, sizeof(g));
    g.batch = n; g.M = cout; g.N = N; g.K = K;
    g.a = w; g.lda = K; g.a_prepacked = w_packed; g.a_bstride = 0;
    g.b = x; g.ldb = N; g.b_bstride = cg->C * cg->H * cg->W;
    g.pack = pointwise ? NULL : pack_im2col;
    g.conv = cg;
    g.c = out; g.ldc = N; g.c_bstride = cout * N;
    g.bias = bias; g.bias_bstride = 0;
    g.res = res; g.ldr = N; g.r_bstride = cout * N;
    g.epi = epi;
    g.tune = tune;
    ak_gemm_f32(&g);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    ak_gemm g;
    memset(&g, 0, sizeof(g));
    g.batch = groups; g.M = coutg; g.N = N; g.K = K;
    g.a = w; g.lda = K; g.a_prepacked = w_packed;
    g.a_bstride = w_packed ? ((coutg + AK_MR - 1) / AK_MR) * AK_MR * K : coutg * K;
    g.b = x + i * groups * cg->C * cg->H * cg->W; g.ldb = N; g.b_bstride = cg->C * cg->H * cg->W;
    g.pack = pointwise ? NULL : pack_im2col;
    g.conv = cg;
    g.c = out + i * cout * N; g.ldc = N; g.c_bstride = coutg * N;
    g.bias = bias; g.bias_bstride = coutg;
    g.res = res ? res + i * cout * N : NULL; g.ldr = N; g.r_bstride = coutg * N;
    g.epi = epi;
    g.tune = tune;
    ak_gemm_f32(&g);
  }
}

/* ---- convolution, NHWC ------------------------------------------------------------------- */

typedef struct {
  const float *x, *w, *bias, *res;
  float* out;
  const ak_conv_geom* g;
  ak_epilogue epi;
  ak_ukr_fn ukr;
  int64_t xc;     /* channels of an input pixel (all groups) */
  int64_t cout;   /* channels of an output pixel (all groups) */
  int64_t group, coutg, M, K, kc, P, mb, ngroups, ppg;
  int pmajor;     /* items run panel group outer, row block inner (see nhwc_plan) */
  int direct;     /* 1x1, stride 1, no padding: x is A as it is */
  int implicit;   /* few channels (the image stems): kernel rows read in place, see nhwc_implicit */
  int64_t px0, px1; /* output columns whose window lies inside the input (ak_inside_cols) */
  int rows;       /* rows per micro-kernel call (the ISA's) */
} ak_nhwc_job;

/* Work item idx -> (row block, panel group). */
static inline void nhwc_item(const ak_nhwc_job* j, int64_t idx, int64_t* blk, int64_t* pg) {
  const int64_t blocks = (j->M + j->mb - 1) / j->mb;
  *blk = j->pmajor ? idx % blocks : idx / j->ngroups;
  *pg = j->pmajor ? idx / blocks : idx % j->ngroups;
}

/* A rows [m0, m0 + rows) of the implicit im2col matrix into dst[rows][K]: per tap, one run of
 * C contiguous channels from the input pixel, or zeros outside the input. */
AK_SHORT_COPIES static void nhwc_gather(const ak_nhwc_job* j, int64_t m0, int64_t rows, float* dst) {
  const ak_conv_geom* g = j->g;
  const int64_t ohw = g->OH * g->OW, C = g->C;
  const size_t run = (size_t)C * sizeof(float);
  /* the row's pixel (img, oy, ox), stepped rather than divided out per row */
  int64_t img = m0 / ohw, oy = (m0 % ohw) / g->OW, ox = m0 % g->OW;
  for (int64_t r = 0; r < rows; ++r, ++ox) {
    if (ox == g->OW) {
      ox = 0;
      if (++oy == g->OH) oy = 0, ++img;
    }
    const float* xi = j->x + img * g->H * g->W * j->xc + j->group * C;
    float* d = dst + r * j->K;
    const int64_t ix0 = ox * g->SW - g->PW;
    for (int64_t ky = 0; ky < g->KH; ++ky) {
      const int64_t iy = oy * g->SH - g->PH + ky * g->DH;
      if (iy < 0 || iy >= g->H) {
        memset(d, 0, run * (size_t)g->KW);
        d += g->KW * C;
        continue;
      }
      if (g->DW == 1 && j->xc == C) { /* the row's taps are one contiguous run of the input */
        int64_t kx0 = ix0 < 0 ? -ix0 : 0, kx1 = g->W - ix0 < g->KW ? g->W - ix0 : g->KW;
        if (kx0 > g->KW) kx0 = g->KW;
        if (kx1 < kx0) kx1 = kx0;
        const int64_t head = kx0 * C, body = (kx1 - kx0) * C, tail = (g->KW - kx1) * C;
        const float* src = xi + (iy * g->W + ix0 + kx0) * C;
        if (g->KW * C <= 64) { /* a few floats (the image stem): inline, not libc calls */
          for (int64_t t = 0; t < head; ++t) d[t] = 0.f;
          for (int64_t t = 0; t < body; ++t) d[head + t] = src[t];
          for (int64_t t = 0; t < tail; ++t) d[head + body + t] = 0.f;
        } else {
          memset(d, 0, (size_t)head * sizeof(float));
          memcpy(d + head, src, (size_t)body * sizeof(float));
          memset(d + head + body, 0, (size_t)tail * sizeof(float));
        }
        d += g->KW * C;
        continue;
      }
      for (int64_t kx = 0; kx < g->KW; ++kx, d += C) {
        const int64_t ix = ix0 + kx * g->DW;
        if (ix < 0 || ix >= g->W) memset(d, 0, run);
        else memcpy(d, xi + (iy * g->W + ix) * j->xc, run);
      }
    }
  }
}

/* Rows [m0, m0 + rows) x panels [pa, pb) of a few-channel conv without a gather: for output
 * pixels whose kernel window lies inside the input in x, kernel row ky of pixels ox, ox+1, ...
 * is KW*C floats at a stride of SW*C in the input, i.e. a row-major A with lda = SW*C, and the
 * next kernel row is one input row (W*C floats) further: one micro-kernel call per tile runs
 * the taps [ky0, ky1) inside the input as segments (ak_epilogue.nseg). The few pixels whose
 * window crosses the left or right edge are gathered as before (into buf). The sums are the
 * gathered path's, in the same order, less the taps in the vertical padding (zero inputs). */
static void nhwc_implicit(const ak_nhwc_job* j, int64_t m0, int64_t rows, int64_t pa, int64_t pb,
                          float* buf) {
  const ak_conv_geom* g = j->g;
  const int64_t C = g->C, ohw = g->OH * g->OW, kw = g->KW * C;
  for (int64_t m = m0; m < m0 + rows;) {
    const int64_t img = m / ohw, oy = (m % ohw) / g->OW, ox = m % g->OW;
    const int64_t end = m0 + rows - m < g->OW - ox ? m0 + rows : m + g->OW - ox; /* this row */
    const int64_t iy0 = oy * g->SH - g->PH;
    int64_t ky0 = 0, ky1 = g->KH;
    while (ky0 < ky1 && iy0 + ky0 < 0) ++ky0;
    while (ky1 > ky0 && iy0 + ky1 - 1 >= g->H) --ky1;
    /* [m, end) = pixels ox .. of row oy, cut into left edge, inside (in place), right edge */
    int64_t cut[4] = {m, m + (j->px0 > ox ? j->px0 - ox : 0), m + (j->px1 > ox ? j->px1 - ox : 0), end};
    if (cut[1] > end) cut[1] = end;
    if (cut[2] > end) cut[2] = end;
    if (cut[2] < cut[1]) cut[2] = cut[1];
    for (int part = 0; part < 3; ++part) {
      const int64_t a0 = cut[part], n = cut[part + 1] - a0;
      if (n <= 0) continue;
      const int gathered = part != 1 || ky1 <= ky0;
      if (gathered) nhwc_gather(j, a0, n, buf);
      const int64_t step = even_rows(n, j->rows);
      for (int64_t p = pa; p < pb; ++p) {
        const int64_t n0 = p * AK_NR;
        const int nv = (int)(j->coutg - n0 < AK_NR ? j->coutg - n0 : AK_NR);
        const float* panel = j->w + p * j->K * AK_NR;
        for (int64_t t0 = 0; t0 < n; t0 += step) {
          const int mr = (int)(n - t0 < step ? n - t0 : step);
          const int64_t row = a0 + t0;
          float* o = j->out + row * j->cout + n0;
          const float* bias = j->bias ? j->bias + n0 : NULL;
          const float* res = j->res ? j->res + row * j->cout + n0 : NULL;
          if (gathered) {
            j->ukr(mr, j->K, buf + t0 * j->K, j->K, panel, o, j->cout, nv, bias, NULL, res,
                   j->cout, &j->epi);
            continue;
          }
          ak_epilogue epi = j->epi;
          epi.nseg = (int)(ky1 - ky0);
          epi.seg_lda = g->W * C;
          const int64_t ix = (ox + (row - m)) * g->SW - g->PW;
          j->ukr(mr, kw, j->x + img * g->H * g->W * C + ((iy0 + ky0) * g->W + ix) * C, g->SW * C,
                 panel + ky0 * kw * AK_NR, o, j->cout, nv, bias, NULL, res, j->cout, &epi);
        }
      }
    }
    m = end;
  }
}

/* Work item = (block of mb rows, group of panels); a thread's consecutive items share a block,
 * which is gathered once: the block stays in L2 while every panel of the group sweeps it. */
static void nhwc_range(int64_t begin, int64_t end, void* ctx) {
  const ak_nhwc_job* j = (const ak_nhwc_job*)ctx;
  float* buf = NULL;
  int64_t gathered = -1;
  for (int64_t idx = begin; idx < end; ++idx) {
    int64_t blk, pg, next_blk, next_pg;
    nhwc_item(j, idx, &blk, &pg);
    nhwc_item(j, idx + 1, &next_blk, &next_pg);
    const int64_t m0 = blk * j->mb, rows = j->M - m0 < j->mb ? j->M - m0 : j->mb;
    const float* a;
    int64_t lda;
    if (j->implicit) {
      if (!buf) buf = ak_scratch((size_t)(j->mb * j->K));
      if (!buf) return; /* out of memory: leave the output as is */
      const int64_t p1 = (pg + 1) * j->ppg < j->P ? (pg + 1) * j->ppg : j->P;
      nhwc_implicit(j, m0, rows, pg * j->ppg, p1, buf);
      continue;
    }
    if (j->direct) {
      a = j->x + m0 * j->xc + j->group * j->g->C;
      lda = j->xc;
    } else {
      if (!buf) buf = ak_scratch((size_t)(j->mb * j->K));
      if (!buf) return; /* out of memory: leave the output as is */
      if (blk != gathered) {
        nhwc_gather(j, m0, rows, buf);
        gathered = blk;
      }
      a = buf;
      lda = j->K;
    }
    const int64_t p1 = (pg + 1) * j->ppg < j->P ? (pg + 1) * j->ppg : j->P;
    /* K blocks: a kc x NR panel slice stays in L1/L2 while the block's row tiles run over it;
     * the partial sums go through the output exactly (same fp32 sums, same order) */
    for (int64_t k0 = 0; k0 < j->K; k0 += j->kc) {
      const int64_t kb = j->K - k0 < j->kc ? j->K - k0 : j->kc;
      ak_epilogue epi = j->epi;
      epi.accumulate = k0 > 0;
      epi.raw = k0 + kb < j->K;
      const int64_t step = even_rows(rows, j->rows);
      for (int64_t p = pg * j->ppg; p < p1; ++p) {
        const int64_t n0 = p * AK_NR;
        const int nv = (int)(j->coutg - n0 < AK_NR ? j->coutg - n0 : AK_NR);
        const float* panel = j->w + p * j->K * AK_NR + k0 * AK_NR;
        const int64_t col = j->group * j->coutg + n0;
        /* the weight slice this thread takes next: the next panel, the next K block's first
         * panel, or the next item's first */
        const float* next = p + 1 < p1 ? panel + j->K * AK_NR
                            : k0 + kb < j->K ? j->w + pg * j->ppg * j->K * AK_NR + (k0 + kb) * AK_NR
                            : idx + 1 < end ? j->w + next_pg * j->ppg * j->K * AK_NR
                                            : NULL;
        for (int64_t t0 = 0; t0 < rows; t0 += step) {
          const int mr = (int)(rows - t0 < step ? rows - t0 : step);
          const int64_t row = m0 + t0;
          epi.pf = slice_prefetch(next, t0 / step, kb);
          j->ukr(mr, kb, a + t0 * lda + k0, lda, panel, j->out + row * j->cout + col, j->cout,
                 nv, j->bias ? j->bias + col : NULL, NULL,
                 j->res ? j->res + row * j->cout + col : NULL, j->cout, &epi);
        }
      }
    }
  }
}

/* The work split of a channels-last conv GEMM: K block, rows per block (about 128 KB of A,
 * L2-resident while the panels sweep it), blocks, panel groups; returns the threads to use.
 * Each thread takes a contiguous run of the items, so the items must split evenly:
 * - blocks are a multiple of the threads and equal to a row (49 rows are 25 + 24, not 32 + 17);
 * - panel-major (allow_pmajor: the fp32 1x1 convs, whose A is read in place): when the weights
 *   outweigh A (more output channels than rows: the 7x7 and 14x14 layers) and A fits in L2,
 *   the items are (panel, row block) with the panel outer, so each thread reads its own half of
 *   the weights. An odd panel count is split into as many row blocks as threads, so the middle
 *   panel is shared (5 panels: 2.5 each, where whole panels went 3 : 2).
 * MobileNetV2's 7x7 and 14x14 1x1 convs: 10-25% faster, the model 2.7% (same process). */
static int64_t nhwc_plan(ak_nhwc_job* jp, ak_tuning tune, int allow_pmajor) {
  const int pool = ak_num_threads();
  const int64_t threads = tune.threads > 0 && tune.threads < pool ? tune.threads : pool;
  /* K block: tuned, or for a long K (3x3 convolutions of 128+ channels, 1x1 of 1024+) 256 when
   * few rows share a panel slice (14x14 and smaller: measured 5-8% faster), else 512 */
  jp->kc = tune.kc > 0 ? tune.kc : (jp->K >= 1024 && jp->M <= 256 ? 256 : jp->K > 1024 ? 512 : jp->K);
  if (jp->kc > jp->K || jp->kc <= 0) jp->kc = jp->K > 0 ? jp->K : 1;
  jp->pmajor = allow_pmajor && threads > 1 && !tune.grain && jp->coutg > jp->M &&
               jp->M * jp->K <= (1 << 18);
  if (jp->pmajor) {
    const int64_t s = jp->P % threads ? threads : 1;
    jp->mb = (jp->M + s - 1) / s;
    jp->ppg = 1;
    jp->ngroups = jp->P;
    return threads;
  }
  int64_t mb = (32768 / jp->kc) / AK_MR * AK_MR;
  mb = mb < AK_MR ? AK_MR : (mb > 512 ? 512 : mb);
  const int64_t mtiles = (jp->M + AK_MR - 1) / AK_MR;
  int64_t blocks = (mtiles * AK_MR + mb - 1) / mb;
  /* one block (few pixels: the 7x7 and 14x14 layers) stays one: the threads split the weight
   * panels instead, so the (large) weights are read once, not once per block */
  if (blocks > 1) blocks = (blocks + threads - 1) / threads * threads;
  if (blocks > mtiles) blocks = mtiles;
  jp->mb = (jp->M + blocks - 1) / blocks;
  blocks = (jp->M + jp->mb - 1) / jp->mb;
  const int64_t want = (tune.grain > 0 ? tune.grain : 4) * threads;
  int64_t ng = blocks >= want ? 1 : (want + blocks - 1) / blocks;
  if (ng > jp->P) ng = jp->P;
  jp->ppg = (jp->P + ng - 1) / ng;
  jp->ngroups = (jp->P + jp->ppg - 1) / jp->ppg;
  return threads;
}

void ak_conv2d_nhwc_f32(const float* x, const float* w, const float* bias, const float* res,
                        float* out, int64_t n, int64_t groups, const ak_conv_geom* g,
                        int64_t cout, ak_epilogue epi, ak_tuning tune) {
  ak_nhwc_job j;
  memset(&j, 0, sizeof(j));
  j.x = x; j.bias = bias; j.res = res; j.out = out; j.g = g;
  j.epi = epi;
  j.epi.bias_mode = bias ? AK_BIAS_COL : AK_BIAS_NONE;
  j.ukr = ak_table()->ukr;
  j.rows = ak_table()->rows;
  j.xc = g->C * groups;
  j.cout = cout;
  j.coutg = cout / groups;
  j.M = n * g->OH * g->OW;
  j.K = g->C * g->KH * g->KW;
  j.P = (j.coutg + AK_NR - 1) / AK_NR;
  j.direct = g->KH == 1 && g->KW == 1 && g->SH == 1 && g->SW == 1 && g->PH == 0 && g->PW == 0 &&
             g->OH == g->H && g->OW == g->W;
  if (j.M <= 0 || j.P <= 0) return;
  const int64_t threads = nhwc_plan(&j, tune, j.direct);
  /* a kernel row of a few channels (KW x C <= 64 floats: the 3-channel stems) is one short run
   * of the input per output pixel, which the gather copied at a cost near the GEMM's own. Only
   * for wide images: the in-place tiles stop at each output row and its edge pixels, so on 8x8
   * images (the demo's digits) calls of 6 + 1 + 1 rows replaced one of 8 (1.4x slower). */
  ak_inside_cols(g, &j.px0, &j.px1);
  j.implicit = ak_table()->segments && !j.direct && groups == 1 && g->DH == 1 && g->DW == 1 &&
               g->KW * g->C <= 64 && j.kc == j.K && j.px1 - j.px0 >= 4 * AK_MR;
  const int64_t wstride = j.P * j.K * AK_NR;
  for (int64_t grp = 0; grp < groups; ++grp) {
    j.group = grp;
    j.w = w + grp * wstride;
    ak_parallel_range_n(nhwc_range, &j, (j.M + j.mb - 1) / j.mb * j.ngroups, (int)threads);
  }
}

/* ---- convolution, NHWC, int8 ---------------------------------------------------------------- */

/* The int8 form of the channels-last conv GEMM: each block of rows (one output pixel's window
 * each) is quantized to u8, then the int8 micro-kernel sweeps the group's panels of s8 weights
 * (ak_dense_u8s8_f32's layout over K = (ky, kx, c)). Dynamic: the fp32 windows are gathered and
 * each quantized with its own range. Static (a calibrated range): the input image was
 * quantized once, and u8 windows are gathered from it: a 3x3 window holds each input pixel 9
 * times, so this quantizes 9x fewer values and gathers a quarter of the bytes. */
typedef struct {
  ak_nhwc_job base;
  const int8_t* wq;
  const float* qp; /* [2][P*NR]: weight scales, column sums */
  const uint8_t* xu8; /* static: the quantized input image, else NULL */
  float x_scale;
  int32_t x_zp;
  uint8_t* out_u8; /* a u8 output (yq), else NULL: j->out then */
  float y_inv;
  int32_t y_zp;
  int64_t K4, ldq;
  const ak_int8_table* i8;
} ak_nhwc_i8_job;

/* The u8 form of nhwc_gather: rows [m0, m0 + rows) of the implicit im2col matrix of the
 * quantized image into dst (row stride ldq), the zero point (the u8 of 0.0) outside the image
 * and in the K padding. */
static void nhwc_gather_u8(const ak_nhwc_i8_job* q, int64_t m0, int64_t rows, uint8_t* dst) {
  const ak_nhwc_job* j = &q->base;
  const ak_conv_geom* g = j->g;
  const int64_t ohw = g->OH * g->OW, C = g->C;
  const int zp = (int)q->x_zp;
  int64_t img = m0 / ohw, oy = (m0 % ohw) / g->OW, ox = m0 % g->OW; /* stepped per row */
  for (int64_t r = 0; r < rows; ++r, ++ox) {
    if (ox == g->OW) {
      ox = 0;
      if (++oy == g->OH) oy = 0, ++img;
    }
    const uint8_t* xi = q->xu8 + img * g->H * g->W * C;
    uint8_t* d = dst + r * q->ldq;
    const int64_t ix0 = ox * g->SW - g->PW;
    for (int64_t ky = 0; ky < g->KH; ++ky) {
      const int64_t iy = oy * g->SH - g->PH + ky * g->DH;
      if (iy < 0 || iy >= g->H) {
        memset(d, zp, (size_t)(g->KW * C));
        d += g->KW * C;
        continue;
      }
      if (g->DW == 1) { /* the row's taps are one contiguous run of the image */
        int64_t kx0 = ix0 < 0 ? -ix0 : 0, kx1 = g->W - ix0 < g->KW ? g->W - ix0 : g->KW;
        if (kx0 > g->KW) kx0 = g->KW;
        if (kx1 < kx0) kx1 = kx0;
        const int64_t head = kx0 * C, body = (kx1 - kx0) * C, tail = (g->KW - kx1) * C;
        memset(d, zp, (size_t)head);
        if (body) memcpy(d + head, xi + (iy * g->W + ix0 + kx0) * C, (size_t)body);
        memset(d + head + body, zp, (size_t)tail);
        d += g->KW * C;
        continue;
      }
      for (int64_t kx = 0; kx < g->KW; ++kx, d += C) {
        const int64_t ix = ix0 + kx * g->DW;
        if (ix < 0 || ix >= g->W) memset(d, zp, (size_t)C);
        else memcpy(d, xi + (iy * g->W + ix) * C, (size_t)C);
      }
    }
    memset(dst + r * q->ldq + j->K, zp, (size_t)(q->ldq - j->K));
  }
}

static void nhwc_i8_range(int64_t begin, int64_t end, void* ctx) {
  const ak_nhwc_i8_job* q = (const ak_nhwc_i8_job*)ctx;
  const ak_nhwc_job* j = &q->base;
  const int64_t mb = j->mb;
  /* scratch: gathered fp32 rows (dynamic only), their u8 rows, a scale and zero point per row */
  const int64_t fbuf = q->xu8 ? 0 : mb * j->K;
  float* buf = ak_scratch((size_t)(fbuf + (mb * q->ldq + 3) / 4 + 2 * mb + 16));
  if (!buf) return; /* out of memory: leave the output as is */
  uint8_t* qa = (uint8_t*)(buf + fbuf);
  float* a_scale = buf + fbuf + (mb * q->ldq + 3) / 4;
  int32_t* a_zp = (int32_t*)(a_scale + mb);
  if (q->xu8)
    for (int64_t r = 0; r < mb; ++r) {
      a_scale[r] = q->x_scale;
      a_zp[r] = q->x_zp;
    }
  int64_t prepared = -1;
  for (int64_t idx = begin; idx < end; ++idx) {
    int64_t blk, pg;
    nhwc_item(j, idx, &blk, &pg);
    const int64_t m0 = blk * mb, rows = j->M - m0 < mb ? j->M - m0 : mb;
    if (blk != prepared) {
      if (q->xu8) {
        nhwc_gather_u8(q, m0, rows, qa);
      } else {
        nhwc_gather(j, m0, rows, buf);
        q->i8->quant_rows(buf, rows, j->K, qa, q->ldq, a_scale, a_zp);
      }
      prepared = blk;
    }
    const int64_t p1 = (pg + 1) * j->ppg < j->P ? (pg + 1) * j->ppg : j->P;
    for (int64_t p = pg * j->ppg; p < p1; ++p) {
      const int64_t n0 = p * AK_NR;
      const int nv = (int)(j->coutg - n0 < AK_NR ? j->coutg - n0 : AK_NR);
      const int8_t* panel = q->wq + p * q->K4 * 4 * AK_NR;
      const int64_t step = even_rows(rows, AK_MR);
      for (int64_t t0 = 0; t0 < rows; t0 += step) {
        const int mr = (int)(rows - t0 < step ? rows - t0 : step);
        const int64_t row = m0 + t0;
        if (q->out_u8) {
          ak_ukr_i8_u8(q->i8, mr, q->K4, qa + t0 * q->ldq, q->ldq, panel, q->out_u8 + row * j->cout + n0,
                       j->cout, nv, a_scale + t0, a_zp + t0, q->qp + n0, q->qp + j->P * AK_NR + n0,
                       j->bias ? j->bias + n0 : NULL, &j->epi, q->y_inv, q->y_zp);
          continue;
        }
        q->i8->ukr(mr, q->K4, qa + t0 * q->ldq, q->ldq, panel, j->out + row * j->cout + n0, j->cout, nv,
               a_scale + t0, a_zp + t0, q->qp + n0, q->qp + j->P * AK_NR + n0,
               j->bias ? j->bias + n0 : NULL, j->res ? j->res + row * j->cout + n0 : NULL, j->cout,
               &j->epi);
      }
    }
  }
}

int ak_conv2d_nhwc_u8s8_f32(const void* x, int x_u8, const int8_t* wq, const float* qp,
                            const float* xq, const float* yq, const float* bias, const float* res,
                            void* out, int64_t n, const ak_conv_geom* g, int64_t cout,
                            ak_epilogue epi, ak_tuning tune) {
  ak_nhwc_i8_job q;
  memset(&q, 0, sizeof(q));
  ak_nhwc_job* j = &q.base;
  if (x_u8 && !xq) return -2; /* the FFI refuses it first */
  j->x = x_u8 ? NULL : (const float*)x; j->bias = bias; j->g = g;
  if (yq) {
    epi.res_mode = AK_RES_NONE; /* a u8 out takes no residual */
    q.out_u8 = (uint8_t*)out;
    q.y_inv = 1.f / yq[0];
    q.y_zp = (int32_t)yq[1];
  } else {
    j->out = (float*)out;
    j->res = res;
  }
  j->epi = epi;
  j->xc = g->C;
  j->cout = j->coutg = cout;
  j->M = n * g->OH * g->OW;
  j->K = g->C * g->KH * g->KW;
  j->P = (cout + AK_NR - 1) / AK_NR;
  if (j->M <= 0 || j->P <= 0) return 0;
  tune.kc = 0; /* no K blocks: the int32 sums stay in the micro-kernel */
  const int64_t threads = nhwc_plan(j, tune, 0);
  j->kc = j->K;
  q.wq = wq;
  q.qp = qp;
  q.K4 = (j->K + 3) / 4;
  q.ldq = q.K4 * 4;
  q.i8 = ak_int8();
  uint8_t* image = NULL;
  if (x_u8) { /* the previous int8 layer's u8 output, on the grid xq */
    q.x_scale = xq[0];
    q.x_zp = (int32_t)xq[1];
    q.xu8 = (const uint8_t*)x;
  } else if (xq) { /* a calibrated range: quantize the image once */
    const int64_t pixels = n * g->H * g->W;
    image = (uint8_t*)aligned_alloc(64, ((size_t)(pixels * g->C) + 64) & ~(size_t)63);
    if (!image) return -1;
    q.x_scale = xq[0];
    q.x_zp = (int32_t)xq[1];
    ak_quant_fixed_rows(q.i8, (const float*)x, pixels, g->C, image, g->C, xq, (int)threads);
    q.xu8 = image;
  }
  ak_parallel_range_n(nhwc_i8_range, &q, (j->M + j->mb - 1) / j->mb * j->ngroups, (int)threads);
  free(image);
  return 0;
}

/* ---- convolution, NHWC, Winograd F(4x4, 3x3) --------------------------------------------- */

typedef struct {
  const float *x, *u, *bias, *res;
  float* out;
  const ak_conv_geom* g;
  ak_epilogue epi;
  const ak_isa_table* isa;
  int64_t cout, P, TH, TW, T, tb, ppg, ngroups, ldm;
} ak_wino_job;

/* Work item = (block of tb tiles, group of ppg weight panels); a thread's consecutive items
 * share a block, whose input transform V[36][tb][C] is computed once. Per item: 36 GEMMs
 * M[xi][tiles][cols] = V[xi] @ U[xi] over the group's panels (raw partial products), then the
 * output transform of the group's channels with the epilogue. */
static void wino_range(int64_t begin, int64_t end, void* ctx) {
  const ak_wino_job* j = (const ak_wino_job*)ctx;
  const ak_conv_geom* g = j->g;
  const int64_t C = g->C, vstride = j->tb * C, mstride = j->tb * j->ldm, tiles = j->TH * j->TW;
  float* v = ak_scratch((size_t)(36 * (vstride + mstride)));
  if (!v) return; /* out of memory: leave the output as is */
  float* m = v + 36 * vstride;
  ak_epilogue raw;
  memset(&raw, 0, sizeof(raw));
  raw.raw = 1;
  raw.scale = 1.f;
  int64_t done = -1;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t blk = idx / j->ngroups, pg = idx % j->ngroups;
    const int64_t t0 = blk * j->tb, nt = j->T - t0 < j->tb ? j->T - t0 : j->tb;
    if (blk != done) {
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t tile = t0 + t, img = tile / tiles, ty = (tile % tiles) / j->TW,
                      tx = tile % j->TW;
        j->isa->wino_in(j->x + img * g->H * g->W * C, g->H, g->W, C, ty * 4 - g->PH,
                        tx * 4 - g->PW, v + t * C, vstride);
      }
      done = blk;
    }
    const int64_t p0 = pg * j->ppg, p1 = p0 + j->ppg < j->P ? p0 + j->ppg : j->P;
    const int64_t slice = C * AK_NR; /* floats of one (xi, panel) weight slice */
    for (int64_t xi = 0; xi < 36; ++xi) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = j->u + (xi * j->P + p) * slice;
        /* the slice this thread takes next: prefetched while this one computes */
        const float* next = p + 1 < p1 ? panel + slice
                            : xi + 1 < 36 ? j->u + ((xi + 1) * j->P + p0) * slice
                            : idx + 1 < end ? j->u + ((idx + 1) % j->ngroups) * j->ppg * slice
                                            : NULL;
        const int64_t step = even_rows(nt, j->isa->rows);
        for (int64_t r0 = 0; r0 < nt; r0 += step) {
          const int mr = (int)(nt - r0 < step ? nt - r0 : step);
          /* call i prefetches C lines (one per k): the slice's 2C lines take two calls */
          raw.pf = slice_prefetch(next, r0 / step, C);
          j->isa->ukr(mr, C, v + xi * vstride + r0 * C, C, panel,
                      m + xi * mstride + r0 * j->ldm + (p - p0) * AK_NR, j->ldm, AK_NR, NULL,
                      NULL, NULL, 0, &raw);
        }
      }
    }
    const int64_t col0 = p0 * AK_NR, nc = (p1 * AK_NR < j->cout ? p1 * AK_NR : j->cout) - col0;
    const int64_t img_out = g->OH * g->OW * j->cout;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t tile = t0 + t, img = tile / tiles, ty = (tile % tiles) / j->TW,
                    tx = tile % j->TW;
      j->isa->wino_out(m + t * j->ldm, mstride, nc, j->out + img * img_out + col0,
                       j->res ? j->res + img * img_out + col0 : NULL, g->OH, g->OW, j->cout,
                       ty * 4, tx * 4, j->bias ? j->bias + col0 : NULL, &j->epi);
    }
  }
}

void ak_conv2d_nhwc_wino_f32(const float* x, const float* u, const float* bias, const float* res,
                             float* out, int64_t n, const ak_conv_geom* g, int64_t cout,
                             ak_epilogue epi, ak_tuning tune) {
  ak_wino_job j;
  memset(&j, 0, sizeof(j));
  j.x = x; j.u = u; j.bias = bias; j.res = res; j.out = out; j.g = g; j.epi = epi;
  j.isa = ak_table();
  j.cout = cout;
  j.P = (cout + AK_NR - 1) / AK_NR;
  j.TH = (g->OH + 3) / 4;
  j.TW = (g->OW + 3) / 4;
  j.T = n * j.TH * j.TW;
  if (j.T <= 0 || j.P <= 0 || g->C <= 0) return;
  const int pool = ak_num_threads();
  const int64_t threads = tune.threads > 0 && tune.threads < pool ? tune.threads : pool;
  /* tiles per block: V (36 x C floats a tile) about 128 KB, so it stays in L2 while the weight
   * panels sweep it; whole micro-tiles of rows */
  int64_t tb = (131072 / (36 * 4 * g->C) + AK_MR / 2) / AK_MR * AK_MR;
  tb = tb < AK_MR ? AK_MR : (tb > 64 ? 64 : tb);
  /* few tiles (14x14 and smaller images): one block, up to 640 KB of V, so the threads split the
   * weight panels and U (4x the GEMM's weights) is read once, not once per block */
  if (36 * 4 * g->C * j.T <= 655360) tb = j.T;
  int64_t blocks = (j.T + tb - 1) / tb;
  /* equal blocks, a multiple of the threads in number; one block stays one (the threads split
   * the panels instead: the weights are read once, not once per block) */
  if (blocks > 1) blocks = (blocks + threads - 1) / threads * threads;
  if (blocks > j.T) blocks = j.T;
  j.tb = (j.T + blocks - 1) / blocks;
  blocks = (j.T + j.tb - 1) / j.tb;
  const int64_t want = (tune.grain > 0 ? tune.grain : 4) * threads;
  int64_t ng = blocks >= want ? 1 : (want + blocks - 1) / blocks;
  if (ng > j.P) ng = j.P;
  j.ppg = (j.P + ng - 1) / ng;
  /* M (36 x the group's columns a tile) about 256 KB as well */
  int64_t ppg_max = 65536 / (36 * j.tb * AK_NR);
  if (ppg_max < 1) ppg_max = 1;
  if (j.ppg > ppg_max) j.ppg = ppg_max;
  j.ngroups = (j.P + j.ppg - 1) / j.ppg;
  j.ldm = j.ppg * AK_NR;
  ak_parallel_range_n(wino_range, &j, blocks * j.ngroups, (int)threads);
}

typedef struct {
  const float *x, *w, *bias, *res;
  float* out;
  const ak_conv_geom* g;
  ak_epilogue epi;
  int64_t C;
  ak_dw_nhwc_row_fn row;
} ak_dw_nhwc_job;

static void dw_nhwc_range(int64_t begin, int64_t end, void* ctx) {
  const ak_dw_nhwc_job* j = (const ak_dw_nhwc_job*)ctx;
  const ak_conv_geom* g = j->g;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t img = idx / g->OH, oy = idx % g->OH;
    const int64_t at = (img * g->OH + oy) * g->OW * j->C;
    j->row(j->x + img * g->H * g->W * j->C, j->w, g, j->C, oy, j->bias,
           j->res ? j->res + at : NULL, j->out + at, &j->epi);
  }
}

void ak_depthwise_nhwc_f32(const float* x, const float* w, const float* bias, const float* res,
                           float* out, int64_t n, int64_t channels, const ak_conv_geom* g,
                           ak_epilogue epi, int threads) {
  ak_dw_nhwc_job j = {x, w, bias, res, out, g, epi, channels, ak_table()->dw_nhwc_row};
  ak_parallel_range_n(dw_nhwc_range, &j, n * g->OH, threads);
}

typedef struct {
  const float *x, *w, *bias, *res;
  float* out;
  const ak_conv_geom* g;
  ak_epilogue epi;
  int64_t C;
} ak_dw_job;

/* Per channel: copy the plane into a zero-padded buffer of width Wp, then accumulate every tap
 * over the whole output computed on a grid of that width (columns >= OW are discarded), so each
 * tap is one long unit- or fixed-stride loop the compiler vectorises, even for 7x7 planes. */
static inline __attribute__((always_inline)) void depthwise_range(int64_t begin, int64_t end,
                                                                  void* ctx) {
  const ak_dw_job* job = (const ak_dw_job*)ctx;
  const ak_conv_geom* g = job->g;
  const ak_isa_table* isa = ak_table();
  const int64_t SH = g->SH, SW = g->SW;
  const int64_t Wp = (g->OW - 1) * SW + (g->KW - 1) * g->DW + 1;
  const int flat = SH == SW;
  const int64_t grid = flat ? g->OH * Wp : g->OW;
  /* rows so that every tap's window, at every grid point, stays inside the buffer */
  const int64_t need = flat ? SW * (grid - 1) + (g->KH - 1) * g->DH * Wp + (g->KW - 1) * g->DW + 1
                            : ((g->OH - 1) * SH + (g->KH - 1) * g->DH + 1) * Wp;
  const int64_t Hp = (need + Wp - 1) / Wp;
  float* pad = ak_scratch((size_t)(Hp * Wp + 64 + grid));
  if (!pad) return;
  memset(pad + Hp * Wp, 0, 64 * sizeof(float)); /* slack the vector loads may read */
  float* acc = pad + Hp * Wp + 64;
  const int64_t copy = g->W < Wp - g->PW ? g->W : (Wp - g->PW > 0 ? Wp - g->PW : 0);
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t c = idx % job->C;
    const float* x = job->x + idx * g->H * g->W;
    const float* w = job->w + c * g->KH * g->KW;
    for (int64_t y = 0; y < Hp; ++y) {
      const int64_t iy = y - g->PH;
      float* d = pad + y * Wp;
      if (iy >= 0 && iy < g->H && copy > 0) {
        memset(d, 0, (size_t)g->PW * sizeof(float));
        memcpy(d + g->PW, x + iy * g->W, (size_t)copy * sizeof(float));
        memset(d + g->PW + copy, 0, (size_t)(Wp - g->PW - copy) * sizeof(float));
      } else {
        memset(d, 0, (size_t)Wp * sizeof(float));
      }
    }
    float* o = job->out + idx * g->OH * g->OW;
    const float* r = job->res ? job->res + idx * g->OH * g->OW : NULL;
    const float bias = job->bias ? job->bias[c] : 0.f;
    if (isa->dw_plane) {
      isa->dw_plane(pad, Wp, w, g, bias, r, o, &job->epi);
      continue;
    }
    if (flat) {
      memset(acc, 0, (size_t)grid * sizeof(float));
      for (int64_t ky = 0; ky < g->KH; ++ky) {
        for (int64_t kx = 0; kx < g->KW; ++kx) {
          const float wv = w[ky * g->KW + kx];
          const float* src = pad + ky * g->DH * Wp + kx * g->DW;
          if (SW == 1) for (int64_t j = 0; j < grid; ++j) acc[j] += wv * src[j];
          else if (SW == 2) for (int64_t j = 0; j < grid; ++j) acc[j] += wv * src[2 * j];
          else for (int64_t j = 0; j < grid; ++j) acc[j] += wv * src[SW * j];
        }
      }
      for (int64_t oy = 0; oy < g->OH; ++oy)
        isa->row_epi(o + oy * g->OW, acc + oy * Wp, g->OW, bias, r ? r + oy * g->OW : NULL,
                     &job->epi);
      continue;
    }
    for (int64_t oy = 0; oy < g->OH; ++oy) {
      memset(acc, 0, (size_t)g->OW * sizeof(float));
      for (int64_t ky = 0; ky < g->KH; ++ky) {
        for (int64_t kx = 0; kx < g->KW; ++kx) {
          const float wv = w[ky * g->KW + kx];
          const float* src = pad + (oy * SH + ky * g->DH) * Wp + kx * g->DW;
          for (int64_t ox = 0; ox < g->OW; ++ox) acc[ox] += wv * src[ox * SW];
        }
      }
      isa->row_epi(o + oy * g->OW, acc, g->OW, bias, r ? r + oy * g->OW : NULL, &job->epi);
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void depthwise_range_dispatch(int64_t begin, int64_t end, void* ctx) {
  depthwise_range(begin, end, ctx);
}

static void depthwise_range_portable(int64_t begin, int64_t end, void* ctx) {
  depthwise_range(begin, end, ctx);
}

void ak_depthwise_f32(const float* x, const float* w, const float* bias, const float* res,
                      float* out, int64_t n, int64_t channels, const ak_conv_geom* g,
                      ak_epilogue epi, int threads) {
  ak_dw_job job = {x, w, bias, res, out, g, epi, channels};
  ak_parallel_range_n(ak_isa() ? depthwise_range_dispatch : depthwise_range_portable, &job,
                      n * channels, threads);
}

/* ---- row kernels ------------------------------------------------------------------------- */

typedef struct {
  const float *x, *gamma, *beta;
  float* out;
  int64_t D;
  float eps;
  ak_rows_fn fn;
} ak_rows_job;

static void rows_range(int64_t begin, int64_t end, void* ctx) {
  const ak_rows_job* job = (const ak_rows_job*)ctx;
  for (int64_t r = begin; r < end; ++r)
    job->fn(job->x + r * job->D, job->gamma, job->beta, job->out + r * job->D, job->D, job->eps);
}

static void softmax_range(int64_t begin, int64_t end, void* ctx) {
  const ak_rows_job* job = (const ak_rows_job*)ctx;
  ak_softmax_rows(ak_table(), job->x + begin * job->D, job->out + begin * job->D, job->D, end - begin,
                  job->D);
}

static void run_rows(void (*body)(int64_t, int64_t, void*), ak_rows_job* job, int64_t rows, int threads) {
  /* whole rows per task; untuned, tiny inputs run on the calling thread */
  if (threads == 1 || (threads == 0 && rows * job->D < 16384)) body(0, rows, job);
  else ak_parallel_range_n(body, job, rows, threads);
}

void ak_layer_norm_f32(const float* x, const float* gamma, const float* beta, float* out,
                       int64_t rows, int64_t D, float eps, int threads) {
  ak_rows_job job = {x, gamma, beta, out, D, eps, ak_table()->layer_norm_row};
  run_rows(rows_range, &job, rows, threads);
}

void ak_rms_norm_f32(const float* x, const float* gamma, float* out, int64_t rows, int64_t D,
                     float eps, int threads) {
  ak_rows_job job = {x, gamma, NULL, out, D, eps, ak_table()->rms_norm_row};
  run_rows(rows_range, &job, rows, threads);
}

void ak_softmax_f32(const float* x, float* out, int64_t rows, int64_t D, int threads) {
  ak_rows_job job = {x, NULL, NULL, out, D, 0.f, NULL};
  run_rows(softmax_range, &job, rows, threads);
}

/* ---- fused attention --------------------------------------------------------------------- */

void ak_pack_t_portable(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += AK_NR) {
    float* d = dst + (r0 / AK_NR) * cols * AK_NR;
    const int64_t nv = rows - r0 < AK_NR ? rows - r0 : AK_NR;
    for (int64_t j = 0; j < nv; ++j) {
      const float* s = src + (r0 + j) * lds;
      for (int64_t c = 0; c < cols; ++c) d[c * AK_NR + j] = s[c];
    }
    if (nv < AK_NR)
      for (int64_t c = 0; c < cols; ++c) memset(d + c * AK_NR + nv, 0, (size_t)(AK_NR - nv) * sizeof(float));
  }
}

void ak_pack_t_f32(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  const ak_isa_table* t = ak_table();
  (t->pack_t && lds < ((int64_t)1 << 25) ? t->pack_t : ak_pack_t_portable)(src, lds, rows, cols, dst);
}

/* dst[p][r][c] = src[r * lds + p * NR + c]: rows x cols (row stride lds) into column panels. */
static void pack_panels(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += AK_NR)
    pack_panel(src + c0, lds, rows, cols - c0 < AK_NR ? cols - c0 : AK_NR, dst + (c0 / AK_NR) * rows * AK_NR);
}

void ak_softmax_rows(const ak_isa_table* t, const float* x, float* out, int64_t ld, int64_t rows,
                     int64_t D) {
  if (t->softmax_rows) {
    t->softmax_rows(x, out, ld, rows, D);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) t->softmax_row(x + r * ld, NULL, NULL, out + r * ld, D, 0.f);
}

#define AK_ATTN_TILES 4 /* micro-tiles of query rows per block (one K or V panel across them) */

typedef struct {
  const ak_attention* a;
  const ak_isa_table* t;
  int64_t rblocks; /* query row blocks per (batch, head) */
} ak_attn_job;

/* Items are (batch, head, row block); a thread packs a head's K^T and V panels once for its
 * consecutive items of that head, then per micro-tile of query rows: the scores (scale and mask
 * in the micro-kernel's epilogue) into a row buffer, softmax in place, and P @ V stored straight
 * into out's [S, H, Dv] rows: the scores never leave the thread's L1/L2. */
static void attn_range(int64_t begin, int64_t end, void* ctx) {
  const ak_attn_job* job = (const ak_attn_job*)ctx;
  const ak_attention* a = job->a;
  const ak_isa_table* t = job->t;
  const int64_t Sk = a->Sk, D = a->D, Dv = a->Dv, H = a->H;
  const int64_t PK = (Sk + AK_NR - 1) / AK_NR, PV = (Dv + AK_NR - 1) / AK_NR;
  const int64_t lds = (Sk + 15) & ~(int64_t)15, qs = H * D, vs = H * Dv;
  const int step_max = t->rows > AK_MR ? t->rows : AK_MR;
  float* kp = ak_scratch((size_t)(PK * D * AK_NR + PV * Sk * AK_NR + AK_ATTN_TILES * step_max * lds));
  if (!kp) return; /* out of memory: leave the output as is */
  float* vp = kp + PK * D * AK_NR;
  float* sb = vp + PV * Sk * AK_NR;
  ak_epilogue se, pe;
  memset(&se, 0, sizeof(se));
  memset(&pe, 0, sizeof(pe));
  se.scale = a->scale;
  se.res_mode = a->mask ? AK_RES_POST_ACT : AK_RES_NONE;
  pe.scale = 1.f;
  int64_t packed = -1;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t bh = idx / job->rblocks, rb = idx % job->rblocks, b = bh / H, h = bh % H;
    if (bh != packed) {
      ak_pack_t_f32(a->k + b * Sk * qs + h * D, qs, Sk, D, kp);
      pack_panels(a->v + b * Sk * vs + h * Dv, vs, Sk, Dv, vp);
      packed = bh;
    }
    const int64_t r0 = a->S * rb / job->rblocks, r1 = a->S * (rb + 1) / job->rblocks;
    const int64_t step = even_rows(r1 - r0, t->rows), blk = AK_ATTN_TILES * step;
    for (int64_t i0 = r0; i0 < r1; i0 += blk) {
      const int64_t i1 = r1 - i0 < blk ? r1 : i0 + blk;
      /* panel-outer over the block's micro-tiles: a K (then V) panel stays in L1 across them */
      for (int64_t p = 0; p < PK; ++p) {
        const int nv = (int)(Sk - p * AK_NR < AK_NR ? Sk - p * AK_NR : AK_NR);
        for (int64_t i = i0; i < i1; i += step) {
          const int mr = (int)(i1 - i < step ? i1 - i : step);
          const float* mrow = a->mask ? a->mask + b * a->m_sb + h * a->m_sh + i * a->m_sr : NULL;
          t->ukr(mr, D, a->q + (b * a->S + i) * qs + h * D, qs, kp + p * D * AK_NR,
                 sb + (i - i0) * lds + p * AK_NR, lds, nv, NULL, NULL, mrow ? mrow + p * AK_NR : NULL,
                 a->m_sr, &se);
        }
      }
      ak_softmax_rows(t, sb, sb, lds, i1 - i0, Sk);
      for (int64_t p = 0; p < PV; ++p) {
        const int nv = (int)(Dv - p * AK_NR < AK_NR ? Dv - p * AK_NR : AK_NR);
        for (int64_t i = i0; i < i1; i += step) {
          const int mr = (int)(i1 - i < step ? i1 - i : step);
          t->ukr(mr, Sk, sb + (i - i0) * lds, lds, vp + p * Sk * AK_NR,
                 a->out + (b * a->S + i) * vs + h * Dv + p * AK_NR, vs, nv, NULL, NULL, NULL, 0, &pe);
        }
      }
    }
  }
}

void ak_attention_f32(const ak_attention* a, int threads) {
  const int64_t S = a->S, BH = a->B * a->H;
  if (BH == 0 || S == 0 || a->Dv == 0) return;
  if (a->Sk == 0) { /* softmax over nothing: P is [S, 0], P @ V is zeros */
    memset(a->out, 0, (size_t)(BH * S * a->Dv) * sizeof(float));
    return;
  }
  const ak_isa_table* t = ak_table();
  const int64_t pool = threads > 0 && threads < ak_num_threads() ? threads : ak_num_threads();
  /* whole heads per item when they share evenly between the threads; otherwise row blocks too
   * (each re-packs its head's K and V: Sk x (D + Dv) copies against S x Sk x (D + Dv) FMAs) */
  int64_t rblocks = 1;
  if (pool > 1 && BH % pool != 0 && BH < 8 * pool) {
    const int64_t tiles = (S + t->rows - 1) / t->rows;
    rblocks = (4 * pool + BH - 1) / BH;
    if (rblocks > tiles) rblocks = tiles;
  }
  ak_attn_job job = {a, t, rblocks};
  ak_parallel_range_n(attn_range, &job, BH * rblocks, (int)pool);
}
