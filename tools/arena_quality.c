/*
 * arena_quality.c - `eformer arena --quality TASK --minutes M`: each mechanism trained on the
 * task for the same time, LRA's accuracy column on a CPU (docs/arena.md).
 *
 * Each run is `eformer train` in a child process of the same binary (so a mechanism that fails
 * or runs out of memory cannot take the arena with it), with --time-limit, a constant learning
 * rate after 100 warm-up steps, --json; the final "eval" record gives the held-out loss,
 * accuracy and bits per byte, the last "train" record the tokens per second.
 */
#define _POSIX_C_SOURCE 200809L

#include "arena.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Appends ' arg' single-quoted for sh to buf. */
static void sh_arg(char *buf, size_t cap, const char *arg) {
    size_t n = strlen(buf);
    if (n + 3 >= cap) return;
    buf[n++] = ' ', buf[n++] = '\'';
    for (const char *p = arg; *p && n + 6 < cap; p++) {
        if (*p == '\'') { /* ' -> '\'' */
            memcpy(buf + n, "'\\''", 4);
            n += 4;
        } else
            buf[n++] = *p;
    }
    buf[n++] = '\'';
    buf[n] = 0;
}

/* The number after "key": in a JSON line, NAN if absent or null. */
static double json_num(const char *line, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    if (!p) return NAN;
    p += strlen(pat);
    if (!strncmp(p, "null", 4)) return NAN;
    char *end;
    double x = strtod(p, &end);
    return end == p ? NAN : x;
}

int arena_quality_run(const arena_quality_cfg *c, const char *name, const char *spec,
                      arena_quality *q) {
    memset(q, 0, sizeof *q);
    q->tokens_per_s = q->loss = q->acc = q->bpb = NAN;
    char model[1200], num[64], cmd[4096] = "", ckpt[1024], log[1024];
    snprintf(model, sizeof model, "%s,attn=%s", c->model, spec);
    snprintf(ckpt, sizeof ckpt, "%s/quality_%s.safetensors", c->dir, name);
    snprintf(log, sizeof log, "%s/quality_%s.log", c->dir, name);
    snprintf(cmd, sizeof cmd, "exec");
    sh_arg(cmd, sizeof cmd, c->exe);
    const char *fixed[] = {"train", "--task", c->task, "--model", model, "--steps", "1000000000",
                           "--sched", "constant", "--warmup", "100", "--save", ckpt, "--json",
                           "--log-every", "20"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) sh_arg(cmd, sizeof cmd, fixed[i]);
    snprintf(num, sizeof num, "%g", c->seconds);
    sh_arg(cmd, sizeof cmd, "--time-limit"), sh_arg(cmd, sizeof cmd, num);
    snprintf(num, sizeof num, "%g", c->lr);
    sh_arg(cmd, sizeof cmd, "--lr"), sh_arg(cmd, sizeof cmd, num);
    snprintf(num, sizeof num, "%d", c->batch);
    sh_arg(cmd, sizeof cmd, "--batch"), sh_arg(cmd, sizeof cmd, num);
    if (c->threads > 0) {
        snprintf(num, sizeof num, "%d", c->threads);
        sh_arg(cmd, sizeof cmd, "--threads"), sh_arg(cmd, sizeof cmd, num);
    }
    if (c->eval_samples > 0) {
        snprintf(num, sizeof num, "%d", c->eval_samples);
        sh_arg(cmd, sizeof cmd, "--eval-samples"), sh_arg(cmd, sizeof cmd, num);
    }
    size_t n = strlen(cmd);
    snprintf(cmd + n, sizeof cmd - n, " 2>");
    sh_arg(cmd, sizeof cmd, log);

    FILE *p = popen(cmd, "r");
    if (!p) {
        snprintf(q->note, sizeof q->note, "could not start eformer train");
        return -1;
    }
    char line[4096];
    int have_eval = 0;
    while (fgets(line, sizeof line, p)) {
        if (strstr(line, "\"split\":\"train\"")) {
            q->tokens_per_s = json_num(line, "tokens_per_s");
            q->steps = (long long)json_num(line, "step");
        } else if (strstr(line, "\"split\":\"eval\"")) {
            q->loss = json_num(line, "loss"), q->acc = json_num(line, "acc");
            q->bpb = json_num(line, "bpb");
            have_eval = 1;
        }
    }
    int st = pclose(p);
    int code = st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (code != 0 || !have_eval) {
        /* the trainer's message is the last line of its log */
        char last[240] = "", buf[512];
        FILE *f = fopen(log, "r");
        while (f && fgets(buf, sizeof buf, f))
            if (!strncmp(buf, "eformer: ", 9)) {
                buf[strcspn(buf, "\n")] = 0;
                snprintf(last, sizeof last, "%.200s", buf + 9);
                break; /* the first error line names the problem */
            }
        if (f) fclose(f);
        snprintf(q->note, sizeof q->note, "eformer train exit %d%s%.200s", code,
                 last[0] ? ": " : "", last);
        return -1;
    }
    q->ok = 1;
    return 0;
}
