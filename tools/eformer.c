/*
 * eformer.c - the `eformer` command: dispatch to the subcommands and their usage text.
 *
 *   eformer bench ...    time a mechanism after checking it against its reference, or the
 *                        training / inference steps of a model (bench.c)
 *   eformer info ...     build, BLAS, CPU, threads, sgemm rate, mechanisms (info.c)
 *   eformer layout ...   a mechanism's attention pattern: pairs, density, a PNG (layout.c)
 *   eformer help [cmd]   usage
 *
 * Subcommands return an exit status (cli.h: 0 ok, 1 failure, 2 usage); only main() exits.
 */
#include "cli.h"

#include <string.h>

static const char usage_main[] =
    "usage: eformer <command> [options]\n"
    "\n"
    "commands:\n"
    "  bench     time an attention mechanism after checking it against its reference path,\n"
    "            or the steps of a Transformer model (--model)\n"
    "  info      version, BLAS, CPU features, threads and the measured sgemm rate;\n"
    "            `eformer info --mechanisms` also lists every mechanism and its options\n"
    "  layout    a mechanism's attention pattern: visible pairs and density per head, and a PNG\n"
    "  help      this text; `eformer help <command>` for a command's options\n"
    "  version   print the version\n";

static const char usage_bench[] =
    "usage: eformer bench --spec S [--batch B] [--heads H] [--len N[,N...]] [--kv-len M[,M...]]\n"
    "                     [--dim D] [--v-dim E] [--backward] [--reps R] [--warmup W]\n"
    "                     [--threads T] [--json] [--no-check]\n"
    "       eformer bench --sweep [--json] [--reps R] [--warmup W] [--threads T] [--no-check]\n"
    "       eformer bench --model M [--len N] [--batch B] [--lens L] [--seed S] [--backward]\n"
    "                     [--reps R] [--warmup W] [--threads T] [--json]\n"
    "\n"
    "Checks mechanism S against its reference path (S with ref=1) at a small shape (batch 2,\n"
    "heads 2, len <= 97, key and query padding on the second sequence), then times it on\n"
    "Gaussian inputs: warm-up runs, then R timed runs of forward (or forward+backward); one line\n"
    "per length.\n"
    "\n"
    "  --spec S          mechanism spec, e.g. flash or full:causal=1 (`eformer info "
    "--mechanisms`)\n"
    "  --batch B         batch size                                         default 1\n"
    "  --heads H         attention heads                                    default 8\n"
    "  --len N,...       query length, or a comma-separated list            default 1024\n"
    "  --kv-len M,...    key/value length: one for every --len, or one each default = len\n"
    "  --dim D           query/key head dimension                           default 64\n"
    "  --v-dim E         value head dimension                               default = dim\n"
    "  --backward        time forward+backward instead of forward\n"
    "  --reps R          timed runs; the median is reported                 default 5\n"
    "  --warmup W        untimed runs before them                           default 1\n"
    "  --threads T       threads of the library and its BLAS     default: processors online\n"
    "  --json            one JSON object per line instead of the table\n"
    "  --no-check        do not check against the reference path\n"
    "  --sweep           the standard sweep: full, flash and flash:causal=1 at len 1024, 2048,\n"
    "                    4096, then every other mechanism with its defaults at 4096 (batch 1,\n"
    "                    heads 8, dim 64), forward and forward+backward\n"
    "  --model M         time a Transformer model instead (below)\n"
    "\n"
    "Columns: median ms; GFLOP/s = the library's analytic FLOP count (ef_attn_flops) / median;\n"
    "sgemm% = that rate over this machine's sgemm rate at 1024^3, measured in the same run;\n"
    "peak = bytes the library reports (workspace, + saved for forward+backward); RSS = peak\n"
    "resident set (reset before each length where Linux allows it, else the process peak);\n"
    "check = max relative error against ref=1 (fails above 1e-4 forward, 1e-3 gradients).\n"
    "JSON keys: spec batch heads q_len kv_len head_dim v_dim pass (\"fwd\" or \"fwdbwd\")\n"
    "median_ms gflops sgemm_gflops peak_bytes rss_bytes check_err threads fraction_of_sgemm;\n"
    "spec is the canonical spec (every option filled in).\n"
    "A length whose plan or memory cannot be had is reported and skipped.\n"
    "\n"
    "--model M builds the model M (ef_model_new: batch B, seed S, train = --backward; it is\n"
    "sized for the spec's max_len) and times its steps on B sequences of N random tokens (a\n"
    "fixed seed; the targets are the next token with head=lm, none at the last valid position,\n"
    "or a random class with head=cls): W warm-up steps, then R timed steps of forward (logits\n"
    "not kept) or, with --backward, forward + zero_grad + backward. One line; there is no\n"
    "reference check. It prints the canonical spec and the parameter count first.\n"
    "\n"
    "  --model M         model spec: comma-separated key=value items, no spaces (include/\n"
    "                    eformer.h, docs/model.md): layers dim heads ff vocab max_len ln_eps\n"
    "                    pos axial_shape axial_dims attn reversible chunks head, e.g.\n"
    "                    layers=6,dim=512,heads=8,vocab=256,max_len=4096,attn=flash:causal=1\n"
    "  --len N           positions per sequence, at most max_len            default max_len\n"
    "                    (the model is sized for max_len and pads shorter calls: to time a\n"
    "                    length, give the spec that max_len)\n"
    "  --batch B         sequences per step                                 default 1\n"
    "  --lens L          valid positions of every sequence, the rest padded default = len\n"
    "  --seed S          the model's seed (parameters, attention layers)    default 1\n"
    "  --backward, --reps, --warmup, --threads, --json: as above (steps instead of runs)\n"
    "\n"
    "Model columns: median ms per step; tok/s = B x valid positions / median; GFLOP/s =\n"
    "ef_model_flops / median (not given when fewer than max_len positions are valid: the count\n"
    "is for B x max_len); sgemm% as above; attn% = time inside the attention mechanisms over\n"
    "the time in forward (and backward), from ef_model_get_stats over the timed steps; dense% =\n"
    "100 - attn% (projections, feed-forward, norms, embedding, head, loss); loss = the last\n"
    "step's mean cross-entropy in nats; params grads saved ws peak = ef_model_get_bytes in MB\n"
    "(peak = their sum, what a step holds); RSS as above.\n"
    "Model JSON keys: model params batch len max_len valid_len seed pass median_ms tokens_per_s\n"
    "flops gflops sgemm_gflops fraction_of_sgemm attn_share dense_share dense_gflops\n"
    "dense_fraction_of_sgemm loss params_bytes\n"
    "grads_bytes saved_bytes workspace_bytes peak_bytes rss_bytes threads reps warmup; model is\n"
    "the canonical spec, params the learned parameter count, flops ef_model_flops per step, the\n"
    "shares fractions in [0, 1]; a value not measured is null.\n"
    "\n"
    "Exit status: 0 ok; 1 a check failed, a run failed or nothing ran; 2 bad usage (a model\n"
    "spec or shape the library refuses included).\n"
    "\n"
    "examples:\n"
    "  eformer bench --spec flash --len 1024,2048,4096 --backward\n"
    "  eformer bench --spec full:causal=1 --len 512 --kv-len 2048 --json\n"
    "  eformer bench --sweep\n"
    "  eformer bench --model layers=6,dim=512,heads=8,vocab=256,max_len=4096,"
    "attn=flash:causal=1 \\\n"
    "                --len 4096 --backward --reps 3\n";

static const char usage_info[] =
    "usage: eformer info [--mechanisms]\n"
    "\n"
    "Prints the version, the BLAS in use (name, kernel, how it was chosen), the CPU features\n"
    "that matter here (AVX-512F, AVX2, FMA), the thread count and the measured sgemm rate at\n"
    "1024^3. --mechanisms also lists every registered mechanism with its options and defaults.\n"
    "Threads: OMP_NUM_THREADS, else every processor online.\n";

static const char usage_layout[] =
    "usage: eformer layout SPEC --len N [--kv-len M] [--heads H] [--png FILE] [--px P]\n"
    "\n"
    "Makes the plan of SPEC (the first argument) for batch 1, H heads, N queries, M keys and\n"
    "head_dim 64, and prints its canonical spec, then per head the visible (query, key) pairs,\n"
    "the density (pairs / (N*M)) and the mean visible keys per query, then the total. Key\n"
    "padding is not part of a pattern; the causal rule is.\n"
    "\n"
    "  --len N       query length (required)\n"
    "  --kv-len M    key length                                        default = len\n"
    "  --heads H     attention heads                                   default 1\n"
    "  --png FILE    draw the pattern as a greyscale PNG: the first 8 heads side by side\n"
    "                (a grey column between them), queries down, keys across, visible pairs\n"
    "                black, invisible white\n"
    "  --px P        largest side of one head's picture in pixels      default 1024\n"
    "                past it one pixel covers f x f pairs, f = ceil(max(N, M) / P), and its grey\n"
    "                is the fraction visible: exact when N*M*(heads drawn) <= 64M pairs, else\n"
    "                from a fixed 8 x 8 grid of pairs per pixel (said on stdout)\n"
    "\n"
    "When every pair was asked (ef_attn_visible), the count drawn must equal the count printed\n"
    "(ef_attn_visible_pairs); a difference is reported as a library bug.\n"
    "--png needs an eformer built with libpng (Debian libpng-dev).\n"
    "Exit status: 0 ok; 1 the plan, the count or the PNG failed; 2 bad usage.\n"
    "\n"
    "examples:\n"
    "  eformer layout flash:causal=1 --len 1024 --png causal.png\n"
    "  eformer layout bigbird:block=16 --len 512 --heads 2 --png bb.png\n"
    "  eformer layout full --len 256 --kv-len 1024 --heads 4\n";

int cli_usage(FILE *f, const char *topic) {
    if (!topic || !*topic) {
        fputs(usage_main, f);
        fputs("\n", f);
        fputs(usage_bench, f);
        fputs("\n", f);
        fputs(usage_info, f);
        fputs("\n", f);
        fputs(usage_layout, f);
        return 0;
    }
    if (strcmp(topic, "bench") == 0)
        fputs(usage_bench, f);
    else if (strcmp(topic, "info") == 0)
        fputs(usage_info, f);
    else if (strcmp(topic, "layout") == 0)
        fputs(usage_layout, f);
    else if (strcmp(topic, "help") == 0 || strcmp(topic, "version") == 0)
        fputs(usage_main, f);
    else
        return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        cli_usage(stderr, NULL);
        return CLI_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        if (argc > 3) return cli_usage_error(NULL, "help: expected at most one command name");
        if (argc == 3 && cli_usage(stdout, argv[2]) != 0)
            return cli_usage_error(NULL, "help: unknown command '%s'", argv[2]);
        if (argc == 2) cli_usage(stdout, NULL);
        return CLI_OK;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        if (argc > 2) return cli_usage_error(NULL, "version: unexpected argument '%s'", argv[2]);
        printf("eformer %s\n", ef_version());
        return CLI_OK;
    }
    if (strcmp(cmd, "bench") == 0) return cli_bench(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0) return cli_info(argc - 1, argv + 1);
    if (strcmp(cmd, "layout") == 0) return cli_layout(argc - 1, argv + 1);
    if (cmd[0] == '-')
        return cli_usage_error(NULL, "unknown option '%s' (expected a command first)", cmd);
    return cli_usage_error(NULL, "unknown command '%s'", cmd);
}
