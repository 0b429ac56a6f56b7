/*
 * cli.h - what the subcommands of the `eformer` tool share: option parsing with full
 * validation, error reporting with hints, timing, memory figures and the SGEMM probe.
 *
 * Exit statuses of the tool: 0 success, 1 a run or a check failed, 2 a usage error.
 * Everything here prints to stderr and returns a status; only main() ends the process.
 */
#ifndef EF_CLI_H
#define EF_CLI_H

#include "eformer.h"

#include <stddef.h>
#include <stdio.h>

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

/* Usage text (eformer.c). `topic` NULL or "" = every subcommand. Returns 0 when the topic
 * is known. */
int cli_usage(FILE *f, const char *topic);

/* Prints "eformer: <message>" and "eformer: hint: see `eformer help <topic>`" to stderr and
 * returns CLI_USAGE. */
int cli_usage_error(const char *topic, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prints "eformer: <ef_status_str>: <ef_last_error()>" and a hint suited to the status;
 * `context` (may be NULL) says what was being done and is printed on the hint line. */
void cli_lib_error(ef_status st, const char *context);
/* The same with the hint line given by the caller (`hint` NULL: the status's usual hint). */
void cli_lib_error_hint(ef_status st, const char *context, const char *hint);

/* ---------------------------------------------------------------------------------------------
 * Options: `--name value`, `--name=value` or a flag `--name`. Each option may be given once.
 * ------------------------------------------------------------------------------------------- */
typedef struct cli_opt {
    const char *name;  /* without the leading "--" */
    int has_value;     /* 1: takes a value; 0: a flag */
    const char *value; /* the value, or "1" for a flag that was given; NULL when absent */
} cli_opt;

/* Fills opts[i].value from argv[first..argc). Unknown options, positional arguments, repeated
 * options and missing values are usage errors (message printed, CLI_USAGE returned). */
int cli_parse_opts(const char *cmd, int argc, char **argv, int first, cli_opt *opts, int n);
/* The option named `name` (a programming error if absent: returns NULL). */
const cli_opt *cli_find_opt(const cli_opt *opts, int n, const char *name);

/* Integer in [min, max]: decimal digits only, nothing after them. Prints a usage error naming
 * --`opt` and returns CLI_USAGE when `s` is malformed or out of range. */
int cli_parse_int(const char *cmd, const char *opt, const char *s, long min, long max, int *out);
/* Comma-separated list of such integers, at most `cap` of them; *count receives how many. */
int cli_parse_int_list(const char *cmd, const char *opt, const char *s, long min, long max,
                       int *out, int cap, int *count);
/* A finite number in [min, max] (strtod syntax: 1e-3, 0.5, 3; it must start with a digit, '.'
 * or '-' and have nothing after it). Prints a usage error naming --`opt` and returns CLI_USAGE
 * otherwise. */
int cli_parse_double(const char *cmd, const char *opt, const char *s, double min, double max,
                     double *out);

/* 1 when the comma-separated spec (an attention spec "name:k=v,...", whose name part is not a
 * key, or a model spec "k=v,...") has an item whose key is exactly `key` ("causal" matches
 * causal=1, not reformer_causal=1). */
int cli_spec_has_key(const char *spec, const char *key);
/* 1 when spec has the item key=value exactly ("precision=bf16" in "flash:precision=bf16,causal=1"). */
int cli_spec_key_is(const char *spec, const char *key, const char *value);

/* ---------------------------------------------------------------------------------------------
 * Models
 * ------------------------------------------------------------------------------------------- */
/* A hint for a model spec the library refused (ef_model_new): the spec's grammar for
 * EF_ERR_ARG / EF_ERR_FORMAT, the sizes for EF_ERR_SHAPE; NULL otherwise (the status's usual
 * hint). */
const char *cli_model_hint(ef_status st);
/* The exit status for a model the library refused to build: CLI_USAGE for a spec or shape it
 * refuses (EF_ERR_ARG, EF_ERR_FORMAT, EF_ERR_SHAPE, EF_ERR_UNSUPPORTED), CLI_FAIL otherwise
 * (running out of memory is not bad usage). */
int cli_model_exit(ef_status st);

/* ---------------------------------------------------------------------------------------------
 * Measurement
 * ------------------------------------------------------------------------------------------- */
/* Seconds on CLOCK_MONOTONIC. */
double cli_now(void);
/* Median of n values (sorts them in place). */
double cli_median(double *t, int n);

/* The machine's SGEMM rate: ef_sgemm on n x n x n, one warm-up then the best of at least `tries`
 * runs and at least 0.2 s.
 * Returns EF_OK and *gflops, or the library's failure (allocation, GEMM). */
ef_status cli_sgemm_gflops(int n, int tries, double *gflops);

/* Peak resident set of the process in bytes (getrusage ru_maxrss). */
size_t cli_peak_rss(void);
/* Lowers the peak-RSS mark to the current resident set (Linux /proc/self/clear_refs "5"),
 * after returning freed heap memory to the system. Returns 1 when the kernel took it, so that
 * cli_peak_rss() then measures what follows; 0 when it is the process peak so far. */
int cli_reset_peak_rss(void);
/* Memory the process could still get, in bytes: Linux MemAvailable, else the machine's
 * physical memory, 0 if unknown. */
size_t cli_avail_mem(void);

/* Writes `s` as a JSON string literal (quotes and escapes included). */
void cli_json_string(FILE *f, const char *s);
/* Writes `,"key":x` with printf format `fmt`, or `,"key":null` when x is not finite. */
void cli_json_num(FILE *f, const char *key, double x, const char *fmt);

/* ---------------------------------------------------------------------------------------------
 * Subcommands
 * ------------------------------------------------------------------------------------------- */
int cli_bench(int argc, char **argv);  /* argv[0] = "bench" */
int cli_info(int argc, char **argv);   /* argv[0] = "info" */
int cli_layout(int argc, char **argv); /* argv[0] = "layout" */
int cli_arena(int argc, char **argv);  /* argv[0] = "arena" */
/* train.c */
int cli_train(int argc, char **argv);    /* argv[0] = "train" */
int cli_eval(int argc, char **argv);     /* argv[0] = "eval" */
int cli_generate(int argc, char **argv); /* argv[0] = "generate" */

#endif
