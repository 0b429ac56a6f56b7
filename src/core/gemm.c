/*
 * gemm.c - ef_sgemm: the dense-product shim. It loads the fastest BLAS it finds at run time
 * (dlopen, so eformer builds without BLAS headers and runs where none is installed) and
 * otherwise uses a portable built-in kernel (plain C, GCC vector extensions, OpenMP).
 *
 * Choice (first hit wins; the result is reported by ef_blas_get_info):
 *   EF_BLAS=none|builtin  built-in kernel only, nothing is loaded
 *   EF_BLAS=dnnl          oneDNN's dnnl_sgemm (libdnnl.so.3/.2), else built-in
 *   EF_BLAS=openblas      OpenBLAS' cblas_sgemm, else built-in
 *   EF_BLAS=blis          BLIS' cblas_sgemm, else built-in
 *   unset (default)       x86-64: dnnl, openblas, blis, built-in; other CPUs: openblas, blis,
 *                         dnnl, built-in (oneDNN 2.x has no fast non-SVE ARM sgemm)
 * Built without EF_HAVE_BLAS, nothing is ever loaded and EF_BLAS is ignored.
 * When the library loads (a constructor), if OPENBLAS_CORETYPE is unset and the CPU has AVX-512
 * F/BW/VL/DQ, OPENBLAS_CORETYPE=SkylakeX is set (setenv, once, before any GEMM thread exists):
 * Debian's OpenBLAS 0.3.21 detects Sapphire Rapids as "Prescott" (SSE3, 8x slower) and reads
 * the variable only when it loads.
 *
 * Measured (AMD EPYC Zen 4, 2 cores, KVM, Debian 12, gcc 12; GFLOP/s, 2 threads, best of 3 x
 * 0.3 s, three interleaved rounds, ranges over the rounds; the clock wanders, compare within
 * a row). Synthetic FMA peak: zmm 222, ymm 227 (Zen 4 splits zmm into two 256-bit halves).
 *   shape (row-major, op)       1024^3 NN   4096x4096x64 NT  4096x64x4096 NN  64x64x4096 TN
 *   OpenBLAS as installed       169-200     129-139          100-149          63-132
 *     (detects this CPU as "Cooperlake": AVX-512 kernels already)
 *   OpenBLAS CORETYPE=SkylakeX  183-200     119-140           99-113          63-71
 *   OpenBLAS CORETYPE=Haswell   177-213     138-149           82-145          68-138
 *   OpenBLAS CORETYPE=Zen       171-208     117-136           96-139          69-138
 *   BLIS 0.9 (arch "zen3")      185-205     115-118          156-162         116-145
 *   oneDNN 2.6 dnnl_sgemm       199-216     180-186          183-191         176-215
 *   built-in (this file)       164-179     131-139           85-105          51-95
 * Choice: oneDNN first on x86-64. It ties for the best 1024^3 rate (~95 % of FMA peak) and
 * is 25-40 % faster than OpenBLAS/BLIS on the attention shapes (K = 64 products), it uses
 * the same OpenMP runtime as eformer (no second spinning thread pool, and a call made inside
 * an eformer parallel region runs single-threaded instead of oversubscribing), and it picks
 * its kernels by CPUID itself. OpenBLAS second (with the CORETYPE fix for AVX-512 CPUs that
 * it misdetects), BLIS third. The built-in kernel (86 GFLOP/s on 1 thread, 1024^3) is the
 * fallback. Details, the commands and caveats: docs/gemm.md.
 *
 * Signals: oneDNN 2.6's AVX-512 sgemm kernels use the stack pointer as a data register, so a
 * signal delivered while one runs has its frame written wherever rsp points, into the heap
 * (a SIGTERM to `eformer train` corrupted the heap: docs/gemm.md). Every call into an external
 * BLAS therefore runs with the asynchronous signals blocked in the calling thread
 * (pthread_sigmask, two system calls per product, ~0.2 us); a signal sent meanwhile is
 * delivered when the product returns. Synchronous signals (SIGSEGV, SIGBUS, SIGFPE, SIGILL,
 * SIGTRAP, SIGSYS, SIGABRT) are left alone.
 */
#define _GNU_SOURCE
#include "core/core.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef EF_HAVE_BLAS
#include <dlfcn.h>
#endif
#if defined(EF_HAVE_OPENMP) && defined(_OPENMP)
#include <omp.h>
#define EF_GEMM_OMP 1
#endif

/* ------------------------------------------------------------------------------------------
 * Built-in kernel: Goto/BLIS-style blocking. op(B) is packed into kc x NR panels, op(A) into
 * MR x kc panels; an MR x NR register tile of C is accumulated by a micro-kernel written with
 * GCC vector extensions (the compiler emits broadcast + FMA). Threads split only the output
 * (blocks of rows / columns of C), and every element of C sees the same summation order, so
 * results do not depend on the thread count.
 * ---------------------------------------------------------------------------------------- */
/* The micro-kernel needs fused multiply-adds: CMakeLists.txt compiles the library with
 * -ffp-contract=fast (-std=c11 alone would turn contraction off). */

#if defined(__AVX512F__)
#define EF_VL 16
#define EF_MR 12
#define EF_BUILTIN_KERNEL "avx512 12x32"
#elif defined(__AVX__)
#define EF_VL 8
#define EF_MR 6
#define EF_BUILTIN_KERNEL "avx2 6x16"
#else
#define EF_VL 4
#define EF_MR 6
#define EF_BUILTIN_KERNEL "generic 6x8"
#endif
#define EF_NV 2
#define EF_NR (EF_VL * EF_NV)
#ifndef EF_GEMM_KC
#define EF_GEMM_KC 256
#endif
#ifndef EF_GEMM_MC
#define EF_GEMM_MC (EF_MR * 8)
#endif
#ifndef EF_GEMM_NC
#define EF_GEMM_NC 2048
#endif

typedef float ef_vf __attribute__((vector_size(EF_VL * sizeof(float))));

static inline ef_vf vload(const float *p) {
    ef_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, ef_vf v) { memcpy(p, &v, sizeof v); }

/* C[mr x nr] = alpha * (Ap * Bp) + beta * C; beta == 0 never reads C. */
static void ukernel(int kc, const float *restrict ap, const float *restrict bp, float alpha,
                    float beta, float *restrict c, size_t ldc, int mr, int nr) {
    ef_vf acc[EF_MR][EF_NV];
    for (int i = 0; i < EF_MR; i++)
        for (int v = 0; v < EF_NV; v++) acc[i][v] = (ef_vf){0};
    for (int p = 0; p < kc; p++) {
        ef_vf bv[EF_NV];
        for (int v = 0; v < EF_NV; v++) bv[v] = *(const ef_vf *)(bp + (size_t)p * EF_NR + v * EF_VL);
#pragma GCC unroll 16
        for (int i = 0; i < EF_MR; i++) {
            const float av = ap[(size_t)p * EF_MR + i];
            for (int v = 0; v < EF_NV; v++) acc[i][v] += av * bv[v];
        }
    }
    if (mr == EF_MR && nr == EF_NR) {
        for (int i = 0; i < EF_MR; i++)
            for (int v = 0; v < EF_NV; v++) {
                float *cp = c + i * ldc + v * EF_VL;
                ef_vf r = acc[i][v] * alpha;
                if (beta != 0.0f) r += beta * vload(cp);
                vstore(cp, r);
            }
        return;
    }
    float t[EF_MR * EF_NR];
    for (int i = 0; i < EF_MR; i++)
        for (int v = 0; v < EF_NV; v++) vstore(t + i * EF_NR + v * EF_VL, acc[i][v] * alpha);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *cp = c + i * ldc + j;
            *cp = beta != 0.0f ? t[i * EF_NR + j] + beta * *cp : t[i * EF_NR + j];
        }
}

/* Packs rows [i0, i0+mc) x cols [p0, p0+kc) of op(A) as MR-row panels (zero padded). */
static void pack_a(int ta, const float *a, size_t lda, int i0, int mc, int p0, int kc, float *dst) {
    for (int ir = 0; ir < mc; ir += EF_MR) {
        const int mr = EF_MIN(EF_MR, mc - ir);
        float *d = dst + (size_t)ir * kc;
        if (!ta) {
            for (int i = 0; i < mr; i++) {
                const float *s = a + (size_t)(i0 + ir + i) * lda + p0;
                for (int p = 0; p < kc; p++) d[(size_t)p * EF_MR + i] = s[p];
            }
        } else {
            for (int p = 0; p < kc; p++) {
                const float *s = a + (size_t)(p0 + p) * lda + i0 + ir;
                for (int i = 0; i < mr; i++) d[(size_t)p * EF_MR + i] = s[i];
            }
        }
        for (int i = mr; i < EF_MR; i++)
            for (int p = 0; p < kc; p++) d[(size_t)p * EF_MR + i] = 0.0f;
    }
}

/* Packs panel `jp` (NR columns from j0 + jp*NR) of rows [p0, p0+kc) of op(B) (zero padded). */
static void pack_b(int tb, const float *b, size_t ldb, int p0, int kc, int j0, int nc, int jp,
                   float *dst) {
    const int jr = jp * EF_NR, nr = EF_MIN(EF_NR, nc - jr);
    float *d = dst + (size_t)jr * kc;
    if (!tb) {
        for (int p = 0; p < kc; p++) {
            const float *s = b + (size_t)(p0 + p) * ldb + j0 + jr;
            for (int j = 0; j < nr; j++) d[(size_t)p * EF_NR + j] = s[j];
            for (int j = nr; j < EF_NR; j++) d[(size_t)p * EF_NR + j] = 0.0f;
        }
    } else {
        for (int j = 0; j < nr; j++) {
            const float *s = b + (size_t)(j0 + jr + j) * ldb + p0;
            for (int p = 0; p < kc; p++) d[(size_t)p * EF_NR + j] = s[p];
        }
        for (int j = nr; j < EF_NR; j++)
            for (int p = 0; p < kc; p++) d[(size_t)p * EF_NR + j] = 0.0f;
    }
}

/* Packing buffers, one pair per calling thread, kept and grown as needed: after the first
 * calls of a given size the built-in kernel allocates nothing (DESIGN: no allocation inside
 * forward or backward). Released when the thread exits. */
typedef struct gemm_bufs {
    float *b, *a;
    size_t bcap, acap; /* floats */
} gemm_bufs;
static pthread_key_t g_buf_key;
static pthread_once_t g_buf_once = PTHREAD_ONCE_INIT;
static void bufs_release(void *p) {
    gemm_bufs *g = p;
    ef_free(g->b);
    ef_free(g->a);
    ef_free(g);
}
static void bufs_key_init(void) { (void)pthread_key_create(&g_buf_key, bufs_release); }

static float *grow(float **buf, size_t *cap, size_t floats) {
    if (floats <= *cap && *buf) return *buf;
    size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
    float *nb = ef_malloc(bytes ? bytes : 64);
    if (!nb) return NULL;
    ef_free(*buf);
    *buf = nb, *cap = floats;
    return nb;
}

/* The calling thread's buffers of at least bfl and afl floats; 0 on failure. */
static int thread_bufs(size_t bfl, size_t afl, float **bbuf, float **abuf) {
    pthread_once(&g_buf_once, bufs_key_init);
    gemm_bufs *g = pthread_getspecific(g_buf_key);
    if (!g) {
        g = ef_mem_calloc(1, sizeof *g);
        if (!g || pthread_setspecific(g_buf_key, g) != 0) {
            ef_free(g);
            return 0;
        }
    }
    *bbuf = grow(&g->b, &g->bcap, bfl);
    *abuf = grow(&g->a, &g->acap, afl);
    return *bbuf && *abuf;
}

static ef_status builtin_sgemm(int ta, int tb, int m, int n, int k, float alpha, const float *a,
                               int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    const int KC = EF_MIN(k, EF_GEMM_KC), NC = EF_MIN(n, EF_GEMM_NC);
    const int MC = EF_GEMM_MC;
    const int nc_pad = (NC + EF_NR - 1) / EF_NR * EF_NR;
    const int mblocks = (m + MC - 1) / MC;
    int nt = 1;
#ifdef EF_GEMM_OMP
    if ((double)m * n * k >= 64.0 * 64 * 64) nt = ef_threads();
#endif
    /* Work items are (row block, column slice) pairs; slice columns when rows are few. */
    int nslices = 1;
    if (nt > 1 && mblocks < 4 * nt)
        nslices = EF_MAX(1, EF_MIN((4 * nt + mblocks - 1) / mblocks, nc_pad / EF_NR));
    const int items = mblocks * nslices;
    if (nt > items) nt = items;
    float *bbuf = NULL, *abuf = NULL;
    if (!thread_bufs((size_t)KC * nc_pad, (size_t)nt * MC * KC, &bbuf, &abuf)) {
        return ef_error(EF_ERR_NOMEM, "ef_sgemm: cannot allocate %zu bytes of packing buffers",
                        ((size_t)KC * nc_pad + (size_t)nt * MC * KC) * sizeof(float));
    }
    const size_t slda = (size_t)lda, sldb = (size_t)ldb, sldc = (size_t)ldc;
#ifdef EF_GEMM_OMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        int tid = 0;
#ifdef EF_GEMM_OMP
        tid = omp_get_thread_num();
#endif
        float *ab = abuf + (size_t)tid * MC * KC;
        for (int jc = 0; jc < n; jc += NC) {
            const int nc = EF_MIN(NC, n - jc), npanels = (nc + EF_NR - 1) / EF_NR;
            const int per_slice = (npanels + nslices - 1) / nslices;
            for (int pc = 0; pc < k; pc += KC) {
                const int kc = EF_MIN(KC, k - pc);
                const float be = pc == 0 ? beta : 1.0f;
#ifdef EF_GEMM_OMP
#pragma omp for schedule(static)
#endif
                for (int jp = 0; jp < npanels; jp++) pack_b(tb, b, sldb, pc, kc, jc, nc, jp, bbuf);
#ifdef EF_GEMM_OMP
#pragma omp for schedule(dynamic, 1)
#endif
                for (int it = 0; it < items; it++) {
                    const int ib = it / nslices, js = it % nslices;
                    const int i0 = ib * MC, mc = EF_MIN(MC, m - i0);
                    const int jp0 = js * per_slice, jp1 = EF_MIN(npanels, jp0 + per_slice);
                    if (jp0 >= jp1) continue;
                    pack_a(ta, a, slda, i0, mc, pc, kc, ab);
                    for (int jp = jp0; jp < jp1; jp++) {
                        const int jr = jp * EF_NR, nr = EF_MIN(EF_NR, nc - jr);
                        for (int ir = 0; ir < mc; ir += EF_MR)
                            ukernel(kc, ab + (size_t)ir * kc, bbuf + (size_t)jr * kc, alpha, be,
                                    c + (size_t)(i0 + ir) * sldc + jc + jr, sldc,
                                    EF_MIN(EF_MR, mc - ir), nr);
                    }
                }
            }
        }
    }
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * Run-time BLAS loading
 * ---------------------------------------------------------------------------------------- */
enum { EF_LIB_BUILTIN = 0, EF_LIB_DNNL, EF_LIB_OPENBLAS, EF_LIB_BLIS };

typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
typedef int (*dnnl_sgemm_fn)(char, char, int64_t, int64_t, int64_t, float, const float *,
                             int64_t, const float *, int64_t, float, float *, int64_t);

static struct {
    int lib;
    cblas_sgemm_fn cblas;
    dnnl_sgemm_fn dnnl;
    void (*set_threads_int)(int);        /* openblas_set_num_threads */
    void (*set_threads_i64)(int64_t);    /* bli_thread_set_num_threads */
    void (*omp_set)(int);                /* the OpenMP runtime oneDNN uses */
    int (*omp_get)(void);
    char name[16], kernel[64], detail[320];
} g_blas;
static pthread_once_t g_blas_once = PTHREAD_ONCE_INIT;
static atomic_int g_req_threads;     /* ef_gemm_set_threads; 0 = follow ef_threads() */
static _Thread_local int g_local_threads; /* ef_gemm_local_threads; 0 = no limit */
static atomic_int g_applied_threads; /* last count given to OpenBLAS/BLIS; 0 = none yet */
static atomic_int g_loaded;          /* blas_load has finished */

static void detail_add(const char *fmt, ...) EF_PRINTF(1, 2);
static void detail_add(const char *fmt, ...) {
    size_t len = strlen(g_blas.detail);
    if (len + 3 >= sizeof g_blas.detail) return;
    if (len) g_blas.detail[len++] = ';', g_blas.detail[len++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_blas.detail + len, sizeof g_blas.detail - len, fmt, ap);
    va_end(ap);
}

#ifdef EF_HAVE_BLAS
static void *open_first(const char *const *names, const char **which) {
    for (int i = 0; names[i]; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h) {
            *which = names[i];
            return h;
        }
    }
    return NULL;
}

static int try_dnnl(void) {
    static const char *const names[] = {"libdnnl.so.3", "libdnnl.so.2", "libdnnl.so", NULL};
    const char *which = NULL;
    void *h = open_first(names, &which);
    if (!h) return 0;
    g_blas.dnnl = (dnnl_sgemm_fn)dlsym(h, "dnnl_sgemm");
    if (!g_blas.dnnl) {
        dlclose(h);
        return 0;
    }
    g_blas.omp_set = (void (*)(int))dlsym(h, "omp_set_num_threads");
    g_blas.omp_get = (int (*)(void))dlsym(h, "omp_get_max_threads");
    int (*isa)(void) = (int (*)(void))dlsym(h, "dnnl_get_effective_cpu_isa");
    const char *(*isa2str)(int) = (const char *(*)(int))dlsym(h, "dnnl_cpu_isa2str");
    typedef struct { int major, minor, patch; } dnnl_ver; /* prefix of dnnl_version_t */
    const dnnl_ver *(*ver)(void) = (const dnnl_ver *(*)(void))dlsym(h, "dnnl_version");
    if (isa && isa2str && isa2str(isa()))
        snprintf(g_blas.kernel, sizeof g_blas.kernel, "%s", isa2str(isa()));
    else
        snprintf(g_blas.kernel, sizeof g_blas.kernel, "%s", "jit");
    snprintf(g_blas.name, sizeof g_blas.name, "dnnl");
    detail_add("%s", which);
    if (ver && ver()) detail_add("oneDNN %d.%d.%d", ver()->major, ver()->minor, ver()->patch);
    if (!g_blas.omp_set || !g_blas.omp_get) detail_add("%s", "thread count not controllable");
    g_blas.lib = EF_LIB_DNNL;
    return 1;
}

static const char *const openblas_names[] = {"libopenblas.so.0", "libopenblasp.so.0",
                                             "libopenblaso.so.0", "libopenblas.so", NULL};
static int openblas_loaded(void) {
    for (int i = 0; openblas_names[i]; i++) {
        void *h = dlopen(openblas_names[i], RTLD_NOW | RTLD_NOLOAD);
        if (h) return dlclose(h), 1;
    }
    return 0;
}

/* 1 when the load-time constructor below set OPENBLAS_CORETYPE. */
static int g_set_coretype;

/* OpenBLAS reads OPENBLAS_CORETYPE only when it loads, and setenv races with getenv in other
 * threads, so the variable is set here, once, when the library itself is loaded (before main
 * for a linked program), never lazily from a GEMM call. Only when eformer may load OpenBLAS
 * (EF_BLAS unset or "openblas"), the variable is unset, OpenBLAS is not loaded yet, and the CPU
 * has AVX-512 F/BW/VL/DQ. */
__attribute__((constructor)) static void openblas_coretype_at_load(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    const char *env = getenv("EF_BLAS");
    if (env && *env && strcmp(env, "openblas") != 0) return;
    if (getenv("OPENBLAS_CORETYPE") || openblas_loaded()) return;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        g_set_coretype = setenv("OPENBLAS_CORETYPE", "SkylakeX", 0) == 0;
#endif
}

static int try_openblas(void) {
    const char *const *names = openblas_names;
    int set_coretype = g_set_coretype;
    int loaded = openblas_loaded();
    const char *which = NULL;
    void *h = open_first(names, &which);
    if (!h) return 0;
    g_blas.cblas = (cblas_sgemm_fn)dlsym(h, "cblas_sgemm");
    if (!g_blas.cblas) {
        dlclose(h);
        return 0;
    }
    g_blas.set_threads_int = (void (*)(int))dlsym(h, "openblas_set_num_threads");
    char *(*core)(void) = (char *(*)(void))dlsym(h, "openblas_get_corename");
    snprintf(g_blas.name, sizeof g_blas.name, "openblas");
    snprintf(g_blas.kernel, sizeof g_blas.kernel, "%s", core && core() ? core() : "unknown");
    detail_add("%s", which);
    if (set_coretype)
        detail_add("%s", "set OPENBLAS_CORETYPE=SkylakeX (unset, CPU has AVX-512)");
    else if (getenv("OPENBLAS_CORETYPE"))
        detail_add("OPENBLAS_CORETYPE=%s", getenv("OPENBLAS_CORETYPE"));
    if (loaded) detail_add("%s", "OpenBLAS was already loaded by the process");
    g_blas.lib = EF_LIB_OPENBLAS;
    return 1;
}

static int try_blis(void) {
    static const char *const names[] = {"libblis.so.4", "libblis-mt.so.4", "libblis.so.3",
                                        "libblis.so", NULL};
    const char *which = NULL;
    void *h = open_first(names, &which);
    if (!h) return 0;
    g_blas.cblas = (cblas_sgemm_fn)dlsym(h, "cblas_sgemm");
    if (!g_blas.cblas) {
        dlclose(h);
        return 0;
    }
    g_blas.set_threads_i64 = (void (*)(int64_t))dlsym(h, "bli_thread_set_num_threads");
    int (*arch)(void) = (int (*)(void))dlsym(h, "bli_arch_query_id");
    const char *(*arch_str)(int) = (const char *(*)(int))dlsym(h, "bli_arch_string");
    snprintf(g_blas.name, sizeof g_blas.name, "blis");
    snprintf(g_blas.kernel, sizeof g_blas.kernel, "%s",
             arch && arch_str && arch_str(arch()) ? arch_str(arch()) : "unknown");
    detail_add("%s", which);
    g_blas.lib = EF_LIB_BLIS;
    return 1;
}
#endif /* EF_HAVE_BLAS */

static void blas_load(void) {
    snprintf(g_blas.name, sizeof g_blas.name, "builtin");
    snprintf(g_blas.kernel, sizeof g_blas.kernel, "%s", EF_BUILTIN_KERNEL);
    g_blas.lib = EF_LIB_BUILTIN;
#ifndef EF_HAVE_BLAS
    detail_add("%s", "built without EF_HAVE_BLAS");
#else
    const char *env = getenv("EF_BLAS");
    if (env && *env) detail_add("EF_BLAS=%s", env);
    if (env && (!strcmp(env, "none") || !strcmp(env, "builtin"))) return;
    int (*const all[])(void) = {
#if defined(__x86_64__) || defined(__i386__)
        try_dnnl, try_openblas, try_blis,
#else
        try_openblas, try_blis, try_dnnl,
#endif
    };
    if (env && *env) {
        int (*one)(void) = !strcmp(env, "dnnl") ? try_dnnl
                         : !strcmp(env, "openblas") ? try_openblas
                         : !strcmp(env, "blis") ? try_blis : NULL;
        if (one) {
            if (!one()) detail_add("%s", "requested library not found, using builtin");
            return;
        }
        detail_add("%s", "unknown EF_BLAS value ignored");
    }
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]()) return;
    detail_add("%s", "no BLAS found (tried oneDNN, OpenBLAS, BLIS)");
#endif
}

/* The signals blocked around an external product: all but the synchronous ones. */
static sigset_t g_async_signals;

static void blas_load_once(void) {
    sigfillset(&g_async_signals);
    static const int sync_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT};
    for (size_t i = 0; i < sizeof sync_signals / sizeof sync_signals[0]; i++)
        sigdelset(&g_async_signals, sync_signals[i]);
    blas_load();
    atomic_store(&g_loaded, 1);
}
static void blas_init(void) { pthread_once(&g_blas_once, blas_load_once); }

void ef_blas_get_info(ef_blas_info *info) {
    blas_init();
    if (!info) return;
    info->name = g_blas.name;
    info->kernel = g_blas.kernel;
    info->detail = g_blas.detail;
}

static void apply_threads(int n) {
    if (n <= 0 || atomic_exchange(&g_applied_threads, n) == n) return;
    if (g_blas.set_threads_int) g_blas.set_threads_int(n);
    if (g_blas.set_threads_i64) g_blas.set_threads_i64((int64_t)n);
}

void ef_gemm_set_threads(int n) {
    atomic_store(&g_req_threads, n > 0 ? n : 0);
    /* Applied now if the library is loaded, else at the next ef_sgemm; never loads here. */
    if (n > 0 && atomic_load(&g_loaded)) apply_threads(n);
}

int ef_gemm_local_threads(int n) {
    int old = g_local_threads;
    g_local_threads = n > 0 ? n : 0;
    return old;
}

/* ------------------------------------------------------------------------------------------
 * ef_sgemm
 * ---------------------------------------------------------------------------------------- */
static ef_status external_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                                const float *a, int lda, const float *b, int ldb, float beta,
                                float *c, int ldc);

ef_status ef_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                   int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (trans_a != 0 && trans_a != 1)
        return ef_error(EF_ERR_ARG, "ef_sgemm: trans_a=%d must be 0 or 1", trans_a);
    if (trans_b != 0 && trans_b != 1)
        return ef_error(EF_ERR_ARG, "ef_sgemm: trans_b=%d must be 0 or 1", trans_b);
    if (m < 0 || n < 0 || k < 0)
        return ef_error(EF_ERR_ARG, "ef_sgemm: sizes m=%d n=%d k=%d must be >= 0", m, n, k);
    const int min_lda = EF_MAX(1, trans_a ? m : k), min_ldb = EF_MAX(1, trans_b ? k : n);
    if (lda < min_lda)
        return ef_error(EF_ERR_ARG, "ef_sgemm: lda=%d must be >= %d (trans_a=%d, m=%d, k=%d)",
                        lda, min_lda, trans_a, m, k);
    if (ldb < min_ldb)
        return ef_error(EF_ERR_ARG, "ef_sgemm: ldb=%d must be >= %d (trans_b=%d, k=%d, n=%d)",
                        ldb, min_ldb, trans_b, k, n);
    if (ldc < EF_MAX(1, n))
        return ef_error(EF_ERR_ARG, "ef_sgemm: ldc=%d must be >= %d (n=%d)", ldc, EF_MAX(1, n), n);
    if (m == 0 || n == 0) return EF_OK;
    if (!c) return ef_error(EF_ERR_ARG, "ef_sgemm: c=NULL with m=%d n=%d", m, n);
    if (k > 0 && (!a || !b))
        return ef_error(EF_ERR_ARG, "ef_sgemm: %s=NULL with k=%d", !a ? "a" : "b", k);

    if (k == 0 || alpha == 0.0f) { /* C = beta * C, A and B not read (BLAS convention) */
        for (int i = 0; i < m; i++) {
            float *ci = c + (size_t)i * ldc;
            if (beta == 0.0f)
                memset(ci, 0, (size_t)n * sizeof(float));
            else if (beta != 1.0f)
                for (int j = 0; j < n; j++) ci[j] *= beta;
        }
        return EF_OK;
    }

    blas_init();
    if (g_blas.lib == EF_LIB_DNNL || g_blas.lib == EF_LIB_OPENBLAS || g_blas.lib == EF_LIB_BLIS) {
        sigset_t old;
        pthread_sigmask(SIG_BLOCK, &g_async_signals, &old);
        ef_status st = external_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                                      ldc);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (st == EF_OK) return EF_OK;
        /* oneDNN refused: the built-in kernel */
    }
    return builtin_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* The external BLAS's product (signals blocked by the caller). EF_ERR_UNSUPPORTED when oneDNN
 * refuses the call (the caller then runs the built-in kernel). */
static ef_status external_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                                const float *a, int lda, const float *b, int ldb, float beta,
                                float *c, int ldc) {
    const int req = atomic_load(&g_req_threads);
    const int nt = g_local_threads > 0 ? g_local_threads : req > 0 ? req : ef_threads();
    if (g_blas.lib == EF_LIB_DNNL) {
        int saved = 0;
        if (g_blas.omp_get && g_blas.omp_set) {
            saved = g_blas.omp_get();
            if (saved != nt) g_blas.omp_set(nt);
        }
        const int st = g_blas.dnnl(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a,
                                   lda, b, ldb, beta, c, ldc);
        if (saved && saved != nt) g_blas.omp_set(saved);
        return st == 0 ? EF_OK : EF_ERR_UNSUPPORTED;
    }
    apply_threads(nt);
    g_blas.cblas(101 /* CblasRowMajor */, trans_a ? 112 : 111, trans_b ? 112 : 111, m, n, k,
                 alpha, a, lda, b, ldb, beta, c, ldc);
    return EF_OK;
}

/* ------------------------------------------------------------------------------------------
 * ef_sgemm_fixed: fixed row blocks, one single-threaded product each (core.h)
 * ---------------------------------------------------------------------------------------- */
typedef struct fixed_gemm {
    int ta, tb, m, n, k;
    float alpha, beta;
    const float *a, *b;
    int lda, ldb, ldc;
    float *c;
    int cols, col_tiles; /* column tile width and count (1 tile of n when the rows suffice) */
    atomic_int st;       /* the first failure, EF_OK if none */
} fixed_gemm;

static void fixed_block(void *ctx, int64_t item, int tid) {
    (void)tid;
    fixed_gemm *g = ctx;
    int rt = (int)(item / g->col_tiles), ct = (int)(item % g->col_tiles);
    int r0 = rt * EF_GEMM_FIXED_ROWS, rows = EF_MIN(EF_GEMM_FIXED_ROWS, g->m - r0);
    int c0 = ct * g->cols, cols = EF_MIN(g->cols, g->n - c0);
    const float *a = g->ta ? g->a + r0 : g->a + (size_t)r0 * g->lda;
    const float *b = g->tb ? g->b + (size_t)c0 * g->ldb : g->b + c0;
    int old = ef_gemm_local_threads(1);
    ef_status st = ef_sgemm(g->ta, g->tb, rows, cols, g->k, g->alpha, a, g->lda, b, g->ldb,
                            g->beta, g->c + (size_t)r0 * g->ldc + c0, g->ldc);
    ef_gemm_local_threads(old);
    int ok = EF_OK;
    if (st) atomic_compare_exchange_strong(&g->st, &ok, (int)st);
}

ef_status ef_sgemm_fixed(int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc) {
    if (m <= 0) return ef_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    /* Tiles: row blocks of EF_GEMM_FIXED_ROWS; when there are fewer than EF_GEMM_FIXED_TILES of
     * them (a short, wide C such as a weight gradient O_h^T dy of 64 rows), the columns are cut
     * too, into tiles of at least 64 columns, so that the product still spreads over threads.
     * The tiling depends on the shape only, never on the thread count. */
    int row_tiles = (m + EF_GEMM_FIXED_ROWS - 1) / EF_GEMM_FIXED_ROWS, col_tiles = 1, cols = n;
    if (row_tiles < EF_GEMM_FIXED_TILES && n > 64) {
        col_tiles = EF_MIN((EF_GEMM_FIXED_TILES + row_tiles - 1) / row_tiles, (n + 63) / 64);
        cols = (n + col_tiles - 1) / col_tiles;
        cols = (cols + 15) / 16 * 16; /* whole vectors */
        col_tiles = (n + cols - 1) / cols;
    }
    fixed_gemm g = {trans_a, trans_b, m, n, k, alpha, beta, a, b, lda, ldb, ldc, c, cols,
                    col_tiles, EF_OK};
    ef_parallel_for((int64_t)row_tiles * col_tiles, ef_threads(), fixed_block, &g);
    ef_status st = (ef_status)atomic_load(&g.st);
    /* the worker's message stayed in its thread: say it again in the caller's */
    return st ? ef_error(st, "a %d x %d x %d product failed (%s)", m, n, k, ef_status_str(st))
              : EF_OK;
}
