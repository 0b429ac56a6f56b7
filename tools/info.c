/*
 * info.c - `eformer info`: what this build runs on (version, BLAS, CPU features, threads, the
 * measured SGEMM rate) and, with --mechanisms, every registered mechanism with its options.
 */
#define _POSIX_C_SOURCE 200809L

#include "attn/flash_bf16.h" /* ef_bf16_cpu_native */
#include "cli.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *yes_no(int x) { return x ? "yes" : "no"; }

/* The vector code this build was compiled for (the kernels use the same flags). */
static const char *build_isa(void) {
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "AVX2+FMA";
#elif defined(__AVX2__)
    return "AVX2";
#elif defined(__SSE2__)
    return "SSE2";
#elif defined(__ARM_NEON)
    return "NEON";
#else
    return "generic";
#endif
}

static void print_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    printf("cpu:       avx512f %s, avx2 %s, fma %s (this build's vector code: %s)\n",
           yes_no(__builtin_cpu_supports("avx512f")), yes_no(__builtin_cpu_supports("avx2")),
           yes_no(__builtin_cpu_supports("fma")), build_isa());
#else
    printf("cpu:       not x86 (this build's vector code: %s)\n", build_isa());
#endif
    const char *env = getenv("EF_BF16");
    int cpu = ef_bf16_cpu_native(), forced = env && !strcmp(env, "emulate");
    printf("bf16:      flash:precision=bf16 runs %s\n",
           forced ? (cpu ? "its fp32 emulation (EF_BF16=emulate; the CPU has AVX512-BF16)"
                         : "its fp32 emulation (EF_BF16=emulate; the CPU has no AVX512-BF16)")
           : cpu  ? "AVX512-BF16 (vdpbf16ps; no AMX kernel)"
                  : "its fp32 emulation (this CPU has no AVX512-BF16)");
}

int cli_info(int argc, char **argv) {
    cli_opt opts[] = {{"mechanisms", 0, NULL}, {"help", 0, NULL}};
    int n = (int)(sizeof opts / sizeof opts[0]);
    int rc = cli_parse_opts("info", argc, argv, 1, opts, n);
    if (rc) return rc;
    if (cli_find_opt(opts, n, "help")->value) {
        cli_usage(stdout, "info");
        return CLI_OK;
    }

    ef_blas_info bi = {0};
    ef_blas_get_info(&bi);
    printf("eformer    %s\n", ef_version());
    printf("blas:      %s, kernel %s (%s)\n", bi.name ? bi.name : "?", bi.kernel ? bi.kernel : "?",
           bi.detail && *bi.detail ? bi.detail : "no detail");
    print_cpu();
    printf("threads:   %d (%ld processors online)\n", ef_get_num_threads(),
           sysconf(_SC_NPROCESSORS_ONLN));
    fflush(stdout);

    double gf = 0;
    ef_status st = cli_sgemm_gflops(1024, 3, &gf);
    if (st) {
        cli_lib_error(st, "measuring sgemm at 1024^3");
        rc = CLI_FAIL;
    } else {
        printf("sgemm:     %.1f GFLOP/s at 1024^3 (best of 3 after a warm-up, %d threads)\n", gf,
               ef_get_num_threads());
    }

    if (cli_find_opt(opts, n, "mechanisms")->value) {
        printf("\nmechanisms (a spec is name[:key=value,...], e.g. flash:causal=1):\n");
        for (int i = 0; i < ef_attn_count(); i++) {
            const char *help = ef_attn_help(ef_attn_name(i));
            printf("\n%s", help ? help : "");
            if (help && *help && help[strlen(help) - 1] != '\n') putchar('\n');
        }
    }
    return rc;
}
