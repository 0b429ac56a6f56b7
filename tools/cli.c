/*
 * cli.c - the helpers every subcommand of `eformer` shares (see cli.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */
int cli_usage_error(const char *topic, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("eformer: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    if (topic && *topic)
        fprintf(stderr, "eformer: hint: see `eformer help %s`\n", topic);
    else
        fprintf(stderr, "eformer: hint: see `eformer help`\n");
    return CLI_USAGE;
}

static const char *status_hint(ef_status st) {
    switch (st) {
    case EF_ERR_ARG: return "see `eformer info --mechanisms` for the mechanisms and their options";
    case EF_ERR_FORMAT:
        return "a spec is name[:key=value,...] with no spaces, e.g. flash:causal=1; "
               "see `eformer info --mechanisms` for the options";
    case EF_ERR_SHAPE: return "check --batch, --heads, --len, --kv-len, --dim and --v-dim";
    case EF_ERR_NOMEM: return "try a smaller --len or --batch";
    case EF_ERR_UNSUPPORTED:
        return "the message says why; `eformer info --mechanisms` lists what each mechanism does";
    case EF_ERR_NUMERIC: return "a non-finite value appeared from finite inputs: please report it";
    case EF_ERR_IO: return "check the path and its permissions";
    default: return NULL;
    }
}

void cli_lib_error_hint(ef_status st, const char *context, const char *hint) {
    const char *detail = ef_last_error();
    fprintf(stderr, "eformer: %s: %s\n", ef_status_str(st),
            detail && *detail ? detail : "(no detail)");
    if (context && *context) fprintf(stderr, "  while: %s\n", context);
    if (!hint) hint = status_hint(st);
    if (hint) fprintf(stderr, "  hint: %s\n", hint);
}

void cli_lib_error(ef_status st, const char *context) { cli_lib_error_hint(st, context, NULL); }

/* ---------------------------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------------------------- */
const cli_opt *cli_find_opt(const cli_opt *opts, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return &opts[i];
    return NULL;
}

int cli_parse_opts(const char *cmd, int argc, char **argv, int first, cli_opt *opts, int n) {
    for (int i = first; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0) arg = "--help";
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0' || arg[2] == '=')
            return cli_usage_error(cmd, "%s: unexpected argument '%s'", cmd, argv[i]);
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        cli_opt *o = NULL;
        for (int j = 0; j < n; j++)
            if (strlen(opts[j].name) == len && strncmp(opts[j].name, name, len) == 0) o = &opts[j];
        if (!o) return cli_usage_error(cmd, "%s: unknown option '--%.*s'", cmd, (int)len, name);
        if (o->value) return cli_usage_error(cmd, "%s: option --%s given twice", cmd, o->name);
        if (!o->has_value) {
            if (eq) return cli_usage_error(cmd, "%s: option --%s takes no value", cmd, o->name);
            o->value = "1";
            continue;
        }
        if (eq) {
            o->value = eq + 1;
        } else {
            /* values never start with "--": `--len --dim 64` is a missing value */
            if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)
                return cli_usage_error(cmd, "%s: option --%s needs a value", cmd, o->name);
            o->value = argv[++i];
        }
        if (*o->value == '\0')
            return cli_usage_error(cmd, "%s: option --%s has an empty value", cmd, o->name);
    }
    return CLI_OK;
}

/* Parses s[0..len) as a decimal integer in [min, max]; 0 or CLI_USAGE with a message. */
static int parse_int_n(const char *cmd, const char *opt, const char *s, size_t len, long min,
                       long max, int *out) {
    char buf[64];
    if (len == 0) return cli_usage_error(cmd, "%s: --%s has an empty item", cmd, opt);
    if (len >= sizeof buf)
        return cli_usage_error(cmd, "%s: --%s '%.*s' is not an integer", cmd, opt, (int)len, s);
    memcpy(buf, s, len);
    buf[len] = '\0';
    /* strtol alone would accept leading spaces and a '+'; insist on [-]digits */
    const char *p = buf[0] == '-' ? buf + 1 : buf;
    if (*p < '0' || *p > '9')
        return cli_usage_error(cmd, "%s: --%s '%s' is not an integer", cmd, opt, buf);
    errno = 0;
    char *end = NULL;
    long v = strtol(buf, &end, 10);
    if (*end != '\0') return cli_usage_error(cmd, "%s: --%s '%s' is not an integer", cmd, opt, buf);
    if (errno == ERANGE || v < min || v > max) {
        int too_small = errno == ERANGE ? buf[0] == '-' : v < min;
        if (too_small && max == INT_MAX) /* "in [1, 2147483647]" would only distract */
            return cli_usage_error(cmd, "%s: --%s %s is out of range: it must be >= %ld", cmd, opt,
                                   buf, min);
        return cli_usage_error(cmd, "%s: --%s %s is out of range: it must be in [%ld, %ld]", cmd,
                               opt, buf, min, max);
    }
    *out = (int)v;
    return CLI_OK;
}

int cli_parse_int(const char *cmd, const char *opt, const char *s, long min, long max, int *out) {
    return parse_int_n(cmd, opt, s, strlen(s), min, max, out);
}

int cli_parse_int_list(const char *cmd, const char *opt, const char *s, long min, long max,
                       int *out, int cap, int *count) {
    *count = 0;
    for (const char *p = s;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (*count >= cap)
            return cli_usage_error(cmd, "%s: --%s has more than %d values", cmd, opt, cap);
        int rc = parse_int_n(cmd, opt, p, len, min, max, &out[*count]);
        if (rc) return rc;
        (*count)++;
        if (!comma) return CLI_OK;
        p = comma + 1;
    }
}

int cli_parse_double(const char *cmd, const char *opt, const char *s, double min, double max,
                     double *out) {
    /* strtod alone would accept leading spaces, '+', "inf", "nan" and hexadecimal */
    const char *p = s[0] == '-' ? s + 1 : s;
    int ok = (*p >= '0' && *p <= '9') || *p == '.';
    for (const char *c = p; ok && *c; c++)
        ok = (*c >= '0' && *c <= '9') || *c == '.' || *c == 'e' || *c == 'E' || *c == '-' ||
             *c == '+';
    errno = 0;
    char *end = NULL;
    double v = ok ? strtod(s, &end) : 0;
    if (!ok || *end != '\0' || end == s || !isfinite(v) || (errno == ERANGE && v != 0))
        return cli_usage_error(cmd, "%s: --%s '%s' is not a number", cmd, opt, s);
    if (v < min || v > max) {
        if (max == HUGE_VAL)
            return cli_usage_error(cmd, "%s: --%s %s is out of range: it must be >= %g", cmd, opt,
                                   s, min);
        return cli_usage_error(cmd, "%s: --%s %s is out of range: it must be in [%g, %g]", cmd,
                               opt, s, min, max);
    }
    *out = v;
    return CLI_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Models
 * ------------------------------------------------------------------------------------------- */
const char *cli_model_hint(ef_status st) {
    switch (st) {
    case EF_ERR_ARG:
    case EF_ERR_FORMAT:
        return "a model spec is comma-separated key=value items with no spaces, e.g. "
               "layers=2,dim=64,heads=2,attn=local:window=32,causal=1 (the keys: `eformer help "
               "bench`, include/eformer.h; the attention options: `eformer info --mechanisms`)";
    case EF_ERR_SHAPE:
        return "the message names the size: one of the spec's (dim a multiple of heads, "
               "max_len, ...) or --batch";
    default: return NULL; /* the status's usual hint */
    }
}

int cli_model_exit(ef_status st) {
    return st == EF_ERR_ARG || st == EF_ERR_FORMAT || st == EF_ERR_SHAPE || st == EF_ERR_UNSUPPORTED
               ? CLI_USAGE
               : CLI_FAIL;
}

/* ---------------------------------------------------------------------------------------------
 * Measurement
 * ------------------------------------------------------------------------------------------- */
double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double cli_median(double *t, int n) {
    if (n <= 0) return 0;
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

ef_status cli_sgemm_gflops(int n, int tries, double *gflops) {
    size_t nn = (size_t)n * n;
    float *a = ef_malloc(nn * sizeof(float)), *b = ef_malloc(nn * sizeof(float));
    float *c = ef_malloc(nn * sizeof(float));
    ef_status st = EF_OK;
    if (!a || !b || !c) {
        st = EF_ERR_NOMEM; /* ef_malloc has set the message */
        goto done;
    }
    ef_rng_normal(1, 0, 0, nn, a);
    ef_rng_normal(1, 1, 0, nn, b);
    double best = 0, start = cli_now();
    /* r = 0 is the warm-up; then at least `tries` runs and at least 0.2 s of them (at most 100),
     * so that a clock that is still ramping up does not decide the figure */
    for (int r = 0; r <= tries || (cli_now() - start < 0.2 && r <= 100); r++) {
        double t0 = cli_now();
        st = ef_sgemm(0, 0, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double t = cli_now() - t0;
        if (st) goto done;
        if (r > 0 && (best == 0 || t < best)) best = t;
    }
    *gflops = best > 0 ? 2.0 * n * n * (double)n / best / 1e9 : 0;
done:
    ef_free(a);
    ef_free(b);
    ef_free(c);
    return st;
}

size_t cli_peak_rss(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return (size_t)ru.ru_maxrss * 1024; /* kilobytes on Linux */
}

int cli_reset_peak_rss(void) {
#if defined(__GLIBC__)
    malloc_trim(0); /* freed heap pages would otherwise count in the new baseline */
#endif
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return 0;
    int ok = fputs("5", f) >= 0;
    ok = (fclose(f) == 0) && ok;
    return ok;
}

size_t cli_avail_mem(void) {
    /* MemAvailable counts reclaimable cache as free; without it, fall back to physical pages */
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb = 0;
        int found = 0;
        while (!found && fgets(line, sizeof line, f))
            found = sscanf(line, "MemAvailable: %llu kB", &kb) == 1;
        fclose(f);
        if (found && kb > 0) return (size_t)kb * 1024;
    }
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return 0;
    return (size_t)pages * (size_t)page;
}

void cli_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

void cli_json_num(FILE *f, const char *key, double x, const char *fmt) {
    fprintf(f, ",\"%s\":", key);
    if (isfinite(x))
        fprintf(f, fmt, x);
    else
        fputs("null", f);
}

/* The value of item `key` in spec (the text after "key=", up to ',' or the end), or NULL. */
static const char *spec_value(const char *spec, const char *key) {
    size_t n = strlen(key);
    const char *colon = strchr(spec, ':'), *eq = strchr(spec, '=');
    /* items start at the spec, after the name's ':' (when it comes before any '='), after ',' */
    const char *p = colon && (!eq || colon < eq) ? colon + 1 : spec;
    for (; p; p = strchr(p, ',')) {
        if (*p == ',') p++;
        if (!strncmp(p, key, n) && p[n] == '=') return p + n + 1;
    }
    return NULL;
}

int cli_spec_has_key(const char *spec, const char *key) { return spec_value(spec, key) != NULL; }

int cli_spec_key_is(const char *spec, const char *key, const char *value) {
    const char *v = spec_value(spec, key);
    size_t n = strlen(value);
    return v && !strncmp(v, value, n) && (v[n] == ',' || v[n] == '\0');
}
