/*
 * eformer.c - the `eformer` command: dispatch to the subcommands and their usage text.
 *
 *   eformer bench ...    time a mechanism after checking it against its reference, or the
 *                        training / inference steps of a model (bench.c)
 *   eformer info ...     build, BLAS, CPU, threads, sgemm rate, mechanisms (info.c)
 *   eformer arena ...    the survey's comparison measured on this machine (arena.c)
 *   eformer layout ...   a mechanism's attention pattern: pairs, density, a PNG (layout.c)
 *   eformer train ...    train a model on a task, with checkpoints and resume (train.c)
 *   eformer eval ...     a saved model's loss and accuracy on a task's eval split (train.c)
 *   eformer generate ... bytes from a byte-level language model (train.c)
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
    "  arena     the survey's comparison measured here: every mechanism's time, memory and\n"
    "            error against exact attention over lengths; a report with tables and plots\n"
    "  layout    a mechanism's attention pattern: visible pairs and density per head, and a PNG\n"
    "  train     train a model on a task: AdamW, schedules, checkpoints, exact resume\n"
    "  eval      a saved model's loss, accuracy and bits per byte on a task's eval split\n"
    "  generate  continue a prompt with a byte-level language model\n"
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
    "check = max relative error against ref=1 (fails above 1e-4 forward, 1e-3 gradients;\n"
    "precision=bf16: 2e-2 and 5e-2).\n"
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

static const char usage_arena[] =
    "usage: eformer arena [--specs LIST|all] [--lens N,N,...] [--batch B] [--heads H] [--dim D]\n"
    "                     [--causal] [--no-backward] [--inputs gaussian,structured]\n"
    "                     [--budget SECONDS] [--mem-budget GB] [--reps R] [--out DIR]\n"
    "                     [--threads T] [--no-plots] [--layer L]\n"
    "                     [--quality TASK [--minutes M] [--quality-model SPEC]\n"
    "                      [--quality-batch B] [--quality-lr X]]\n"
    "\n"
    "The survey's comparison, measured here: every mechanism on the same inputs at each length;\n"
    "median time of forward and forward+backward, GFLOP/s and its fraction of the sgemm rate\n"
    "measured before that length, the library's bytes and the peak resident set, and the\n"
    "relative Frobenius error of the output and of dq, dk, dv against exact attention (computed\n"
    "separately with plain GEMMs; lsh against exact shared-QK attention). Then the survey's\n"
    "table with the fitted time and memory exponents, and in --out: results.csv, results.json,\n"
    "report.md and the plots (gnuplot). docs/arena.md explains every column.\n"
    "\n"
    "  --specs LIST      ';'-separated specs (quote it), or all: every mechanism with its\n"
    "                    documented defaults, and flash:precision=bf16       default all\n"
    "  --lens N,...      ascending lengths                  default 1024,2048,4096,8192,16384\n"
    "  --batch B --heads H --dim D                              defaults 1, 8, 64\n"
    "  --causal          causal=1 in every spec (mechanisms without a causal form are marked)\n"
    "  --no-backward     forward only (errors of the output only)\n"
    "  --inputs KINDS    gaussian: N(0,1) q, k, v; structured: attention peaked on nearby\n"
    "                    positions plus one long-range match per query;  default both\n"
    "                    model:FILE: the q, k, v of layer --layer (default 0) of a model\n"
    "                    `eformer train --save FILE` wrote, on its task's first eval samples\n"
    "                    (heads and dim are the model's; lengths up to its max_len)\n"
    "  --budget S        skip (and mark) a length where one pass would take over S seconds,\n"
    "                    extrapolated from the shorter lengths; fewer reps above S / R\n"
    "                                                                        default 30\n"
    "  --mem-budget GB   skip (and mark) a length where workspace + saved exceed GB\n"
    "                                         default: half the available memory, at most 8\n"
    "  --reps R          timed runs after one warm-up; the median           default 3\n"
    "  --out DIR         where the files go (created)                       default arena\n"
    "  --threads T       threads of the library and its BLAS     default: processors online\n"
    "  --no-plots        do not run gnuplot\n"
    "  --quality TASK    then train each mechanism on TASK (`eformer help train`) for M\n"
    "                    minutes (default 5) with `eformer train --time-limit`: model\n"
    "                    --quality-model (default layers=2,dim=128,heads=4,ff=512), batch\n"
    "                    --quality-batch (8), lr --quality-lr (1e-3, constant); a table of\n"
    "                    held-out accuracy (bits per byte for text) against speed-up,\n"
    "                    quality.csv and quality.png\n"
    "\n"
    "Times and bytes come from the first input kind; errors from every kind. Progress (which\n"
    "mechanism and length, elapsed, an estimate of the time left) goes to stderr, the table to\n"
    "stdout. Exit status 1 when a mechanism failed (not when it was skipped or refused).\n";

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

static const char usage_train[] =
    "usage: eformer train --task T --model SPEC [--batch B] [--steps S] [--stop-at S]\n"
    "                     [--lr X] [--sched cosine|constant|rsqrt|linear] [--warmup W]\n"
    "                     [--min-lr X] [--wd X] [--clip X] [--accum K] [--eval-every E]\n"
    "                     [--eval-samples N] [--save PATH] [--save-every E] [--seed S]\n"
    "                     [--threads T] [--json] [--log-every L] [--time-limit S]\n"
    "       eformer train --resume PATH [--steps S] [options as above]\n"
    "\n"
    "Trains the model SPEC on the task T with AdamW (docs/training.md, docs/tasks.md). The\n"
    "model is SPEC + \",\" + the task's model keys (vocab=, max_len=, head=; SPEC may give its\n"
    "own head= with the task's classes, e.g. head=cls:classes=10,pool=mean); a next-token task\n"
    "(dup, copy, recall, text) needs causal=1 in every attention spec.\n"
    "Step s (from 1) trains on the K micro-batches of B train samples that start at sample\n"
    "(s-1)*B*K, in order: the data position is a function of the step alone.\n"
    "\n"
    "  --task T          dup:len=1024,symbols=127  copy:len=128,symbols=10  recall:len=256,...\n"
    "                    listops  text:FILE,len=1024  mnist[:DIR]  fashion-mnist[:DIR]\n"
    "  --model SPEC      model keys (`eformer help bench`, docs/model.md), e.g.\n"
    "                    layers=2,dim=128,heads=4,attn=local:window=64,causal=1\n"
    "  --batch B         samples per micro-batch (the model's batch)          default 8\n"
    "  --accum K         micro-batches per step (gradient accumulation)      default 1\n"
    "  --steps S         steps of the run; the schedule's total              default 1000\n"
    "  --stop-at S       stop (evaluate, save) after step S < --steps; --resume continues\n"
    "                    the same run to --steps\n"
    "  --lr X            peak learning rate, reached at the end of warmup    default 1e-3\n"
    "  --sched KIND      cosine (to --min-lr at --steps), constant, rsqrt (lr*sqrt(W/t)),\n"
    "                    linear (to --min-lr)                                default cosine\n"
    "  --warmup W        linear warmup steps                                 default 100\n"
    "  --min-lr X        final rate of cosine and linear                     default 0\n"
    "  --wd X            decoupled weight decay (matrices and embedding)     default 0.01\n"
    "  --clip X          global gradient-norm clip, 0 = none                 default 1.0\n"
    "  --eval-every E    evaluate every E steps; 0 = only at the end         default 0\n"
    "  --eval-samples N  eval samples (from the eval split's start)  default: the whole split\n"
    "  --save PATH       checkpoint: PATH (the model, `eformer eval --load PATH` reads it) and\n"
    "                    PATH.opt (optimizer state, the run's options); written at the end\n"
    "  --save-every E    also every E steps                                  default 0\n"
    "  --resume PATH     continue the run saved in PATH: model, optimizer state, step, task\n"
    "                    and options come from it; options given must agree with it (else a\n"
    "                    usage error names the difference), except the run-control ones\n"
    "                    (--eval-every, --eval-samples, --save, --save-every, --log-every,\n"
    "                    --json, --threads, --stop-at, --time-limit) and --steps when the\n"
    "                    schedule does not depend on it (constant, rsqrt). Saves to PATH\n"
    "                    unless --save is given.\n"
    "  --seed S          model initialisation and the task's samples         default 1\n"
    "  --time-limit S    end the run (evaluate, save) after the first step that finishes\n"
    "                    S seconds after the start; with --sched constant or rsqrt a\n"
    "                    --resume continues it exactly                       default none\n"
    "  --threads T       threads                                 default: processors online\n"
    "  --json            one JSON object per log line on stdout\n"
    "  --log-every L     a log line every L steps (and at the last)          default 10\n"
    "\n"
    "A resumed run is bit for bit the run that was not stopped: `train --steps 10` and\n"
    "`train --steps 10 --stop-at 5 --save A` then `train --resume A` write the same files (with\n"
    "--sched constant or rsqrt also `--steps 5 --save A`, then `--resume A --steps 10`).\n"
    "\n"
    "Output. When stderr is a terminal, a progress bar redrawn in place: step/total, loss and\n"
    "accuracy (moving averages), tokens/s, lr, ETA. Log lines on stdout every L steps (not\n"
    "when the bar shares the terminal with them): the mean loss (nats) and accuracy of the\n"
    "steps since the previous line, tokens/s (valid positions trained per second of training),\n"
    "the last step's lr and gradient norm (before clipping), the time since the start.\n"
    "Eval lines: count-weighted mean loss and accuracy over every scored target of the first\n"
    "N eval samples, bits per byte (loss / ln 2) for text.\n"
    "JSON (--json): the first object has split \"start\" and model (canonical spec), params,\n"
    "task (canonical spec), seed, batch, accum, steps, start_step, end_step, optim,\n"
    "eval_samples, threads [, resumed_from]; log lines have split \"train\" and step, loss,\n"
    "acc, tokens_per_s, lr, grad_norm, elapsed_s; eval lines split \"eval\" and step, loss, acc,\n"
    "bpb (text tasks only), count (targets), samples, elapsed_s, complete. Other messages go to\n"
    "stderr.\n"
    "\n"
    "Ctrl-C (SIGINT) or SIGTERM: the run stops after the current step (or between eval\n"
    "batches), writes the checkpoint to --save PATH (without --save to\n"
    "./" "eformer-interrupted.safetensors), says where and exits with status 130 (SIGINT) or 143\n"
    "(SIGTERM). A second Ctrl-C ends it at once.\n"
    "Exit status: 0 ok; 1 a step, an evaluation or a save failed; 2 bad usage (an unknown task,\n"
    "a model spec the library refuses, a non-causal model for a causal task, a disagreement\n"
    "with the checkpoint); 130 / 143 interrupted (checkpoint written).\n"
    "\n"
    "examples:\n"
    "  eformer train --task dup:len=256,symbols=127 \\\n"
    "                --model layers=1,dim=256,heads=4,ff=256,attn=flash:causal=1 \\\n"
    "                --steps 300 --warmup 50 --eval-every 50 --save dup.safetensors\n"
    "  eformer train --resume dup.safetensors --steps 300\n"
    "  eformer train --task text:data/kjv.txt,len=256 --batch 16 --steps 2000 \\\n"
    "                --model layers=4,dim=256,heads=4,attn=local:window=64,causal=1 \\\n"
    "                --eval-every 500 --eval-samples 200 --save kjv.safetensors --json\n";

static const char usage_eval[] =
    "usage: eformer eval --load PATH [--task T] [--batch B] [--eval-samples N] [--seed S]\n"
    "                    [--threads T] [--json]\n"
    "\n"
    "Loads the model PATH (ef_model_load; for a training checkpoint the model file, not\n"
    "PATH.opt) and reports its mean loss (nats) and accuracy over every scored target of the\n"
    "task's eval split, and bits per byte for text. A checkpoint written by `eformer train`\n"
    "records its task and seed in PATH.opt: they are the defaults of --task and --seed (the\n"
    "seed draws a generated task's samples, the eval split's included).\n"
    "\n"
    "  --load PATH       the model file (required)\n"
    "  --task T          the task (required unless PATH.opt records it)\n"
    "  --batch B         samples per forward                                 default 8\n"
    "  --eval-samples N  the first N eval samples                  default: the whole split\n"
    "  --seed S          the task's seed                       default: PATH.opt's, else 1\n"
    "  --threads T       threads                                 default: processors online\n"
    "  --json            a start object and an eval object (keys as in `eformer help train`)\n"
    "\n"
    "The model must fit the task: the same head, a vocabulary covering the task's, max_len at\n"
    "least its rows, and causal attention for a next-token task (exit status 2 otherwise).\n"
    "\n"
    "examples:\n"
    "  eformer eval --load dup.safetensors\n"
    "  eformer eval --load kjv.safetensors --task text:data/kjv.txt,len=256 --eval-samples 100\n";

static const char usage_generate[] =
    "usage: eformer generate --load PATH --prompt TEXT [--max-new N] [--temperature X]\n"
    "                        [--seed S] [--threads T]\n"
    "\n"
    "Continues TEXT with a causal byte-level language model (head=lm, vocab=256, causal=1: a\n"
    "model trained on a text: task; anything else is refused with exit status 2). The tokens\n"
    "are the prompt's bytes; each new byte comes from the logits of the last position, the\n"
    "largest at temperature 0 (ties: the smallest byte), else drawn from softmax(logits / X)\n"
    "with a seeded generator. The prompt, then each byte as it comes, is written to stdout.\n"
    "\n"
    "A model whose every layer has a decoding state (linear and performer with causal=1) uses\n"
    "incremental decoding (ef_model_decoder): the prompt once, then one step per new byte,\n"
    "O(1) in the length, up to max_len positions. Other models (and any model past max_len)\n"
    "run ef_model_forward over the sequence so far (the last max_len bytes once it is longer)\n"
    "for every new byte, O(N^2) positions for N bytes.\n"
    "\n"
    "  --load PATH       the model file (required)\n"
    "  --prompt TEXT     the start of the text (required, not empty)\n"
    "  --max-new N       bytes to generate                                   default 200\n"
    "  --temperature X   0 = greedy                                          default 1.0\n"
    "  --seed S          the sampling seed                                   default 1\n"
    "  --threads T       threads                                 default: processors online\n"
    "\n"
    "examples:\n"
    "  eformer generate --load kjv.safetensors --prompt 'Ge1:1 In the beginning' --max-new 300\n"
    "  eformer generate --load kjv.safetensors --prompt 'Joh3:16 ' --temperature 0\n";

int cli_usage(FILE *f, const char *topic) {
    if (!topic || !*topic) {
        fputs(usage_main, f);
        fputs("\n", f);
        fputs(usage_bench, f);
        fputs("\n", f);
        fputs(usage_info, f);
        fputs("\n", f);
        fputs(usage_arena, f);
        fputs("\n", f);
        fputs(usage_layout, f);
        fputs("\n", f);
        fputs(usage_train, f);
        fputs("\n", f);
        fputs(usage_eval, f);
        fputs("\n", f);
        fputs(usage_generate, f);
        return 0;
    }
    if (strcmp(topic, "bench") == 0)
        fputs(usage_bench, f);
    else if (strcmp(topic, "info") == 0)
        fputs(usage_info, f);
    else if (strcmp(topic, "arena") == 0)
        fputs(usage_arena, f);
    else if (strcmp(topic, "layout") == 0)
        fputs(usage_layout, f);
    else if (strcmp(topic, "train") == 0)
        fputs(usage_train, f);
    else if (strcmp(topic, "eval") == 0)
        fputs(usage_eval, f);
    else if (strcmp(topic, "generate") == 0)
        fputs(usage_generate, f);
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
    if (strcmp(cmd, "arena") == 0) return cli_arena(argc - 1, argv + 1);
    if (strcmp(cmd, "train") == 0) return cli_train(argc - 1, argv + 1);
    if (strcmp(cmd, "eval") == 0) return cli_eval(argc - 1, argv + 1);
    if (strcmp(cmd, "generate") == 0) return cli_generate(argc - 1, argv + 1);
    if (cmd[0] == '-')
        return cli_usage_error(NULL, "unknown option '%s' (expected a command first)", cmd);
    return cli_usage_error(NULL, "unknown command '%s'", cmd);
}
