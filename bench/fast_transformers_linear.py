#!/usr/bin/python3
"""fast_transformers_linear.py - eformer's `linear` against fast-transformers' linear attention,
forward+backward, in one process, on the same machine, in the same run.

  ft       fast-transformers' LinearAttention (non-causal: pure PyTorch einsums) or
           CausalLinearAttention (--causal: its C++ extension causal_product_cpu), elu(x)+1
           feature map, eps 1e-6, layout (N, L, H, E), autograd backward
  eformer  eformer.torch.attention(q, k, v, spec="linear[:causal=1]"), layout (B, H, N, D),
           the C library's forward and backward

fast-transformers is not part of eformer: point --ft at a checkout of
https://github.com/idiap/fast-transformers (built or not). Its package imports compiled
extensions it does not need for linear attention; when they are missing, the modules used here
are loaded without running fast_transformers/attention/__init__.py, and for --causal the
extension causal_product_cpu is compiled from the checkout's causal_product_cpu.cpp with
torch.utils.cpp_extension, with setup.py's flags (-fopenmp -ffast-math; -O2 as setuptools),
into --build-dir. Nothing is copied.

Before timing, both are run on a small shape (B=2, H=3, L=300, E=20, Gaussian inputs) and their
outputs and gradients compared (the script stops when they differ by more than 1e-4 of the
largest value). Then, for --rounds rounds, each is timed as the median of --reps
forward+backward passes after a warm-up, alternating (ft, eformer, ft, eformer, ...); the
medians over rounds, the ratio ft / eformer of the medians and of each round (a pair run back
to back) are printed, and the same for the process's CPU time (user + system of all its
threads: with --threads 1 a measure of work that other processes on the machine barely move;
with more threads it also counts OpenMP's spinning).

    /usr/bin/python3 bench/fast_transformers_linear.py --ft /path/to/fast-transformers \\
        [--len 16384] [--heads 8] [--dim 64] [--batch 1] [--causal] [--reps 5] [--rounds 3] \\
        [--threads 2] [--json]
"""
import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from torch_twin import loaded_blas, prepare_env  # noqa: E402


def import_ft(ft, causal, build_dir):
    """fast-transformers' LinearAttention (or CausalLinearAttention) class and its masks, from
    the checkout at `ft`; returns (cls, masking module, how it was loaded)."""
    pkg = os.path.join(ft, "fast_transformers")
    if not os.path.isfile(os.path.join(pkg, "attention", "linear_attention.py")):
        sys.exit(f"fast_transformers_linear: {ft} is not a fast-transformers checkout "
                 "(no fast_transformers/attention/linear_attention.py)")
    sys.path.insert(0, os.path.abspath(ft))
    how = []
    try:  # a built checkout imports as it is
        importlib.import_module("fast_transformers.attention")
        how.append("package as is")
    except ImportError as e:
        # The attention package's __init__ imports every attention, some of which need compiled
        # extensions (hashing, clustering, ...). Register the package without running it, so
        # that its submodules import on their own.
        for m in [m for m in sys.modules if m.startswith("fast_transformers.attention")]:
            del sys.modules[m]
        stub = types.ModuleType("fast_transformers.attention")
        stub.__path__ = [os.path.join(pkg, "attention")]
        sys.modules["fast_transformers.attention"] = stub
        how.append(f"attention/__init__.py skipped ({e})")
    if causal:
        name = "fast_transformers.causal_product.causal_product_cpu"
        try:
            importlib.import_module(name)
            how.append("causal_product_cpu as built")
        except ImportError:
            from torch.utils.cpp_extension import load
            os.makedirs(build_dir, exist_ok=True)
            src = os.path.join(pkg, "causal_product", "causal_product_cpu.cpp")
            sys.modules[name] = load(name="causal_product_cpu", sources=[src],
                                     extra_cflags=["-O2", "-fopenmp", "-ffast-math"],
                                     extra_ldflags=["-fopenmp"], build_directory=build_dir)
            how.append(f"causal_product_cpu compiled from {src} into {build_dir}")
        mod = importlib.import_module("fast_transformers.attention.causal_linear_attention")
        cls = mod.CausalLinearAttention
    else:
        mod = importlib.import_module("fast_transformers.attention.linear_attention")
        cls = mod.LinearAttention
    masking = importlib.import_module("fast_transformers.masking")
    return cls, masking, "; ".join(how)


def make_ft(torch, cls, masking, B, L, E, causal):
    att = cls(E)
    mask = masking.TriangularCausalMask(L) if causal else masking.FullMask(L)
    lens = masking.LengthMask(torch.full((B,), L, dtype=torch.int64), max_len=L)

    def run(q, k, v):  # (N, L, H, E)
        return att(q, k, v, mask, lens, lens)
    return run


def compare_small(torch, et, cls, masking, causal):
    """Max |difference| / max |value| of out, dq, dk, dv between ft and eformer."""
    B, H, L, E = 2, 3, 300, 20  # L crosses eformer's chunks (64 causal, 256 not)
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(B, H, L, E, generator=g, dtype=torch.float64).float()
                     for _ in range(4))
    spec = "linear:causal=1" if causal else "linear"
    res = {}
    for name in ("ft", "eformer"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if name == "ft":
            run = make_ft(torch, cls, masking, B, L, E, causal)
            out = run(*(t.transpose(1, 2) for t in (qq, kk, vv))).transpose(1, 2)
        else:
            out = et.attention(qq, kk, vv, spec=spec)
        out.backward(dout)
        res[name] = [out.detach(), qq.grad, kk.grad, vv.grad]
    errs = {}
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        a, b = res["ft"][i], res["eformer"][i]
        errs[what] = float((a - b).abs().max() / a.abs().max())
    return errs


def median_time(fn, reps):
    """Median wall seconds and median CPU seconds of this process (all its threads) over reps
    runs after one warm-up."""
    fn()
    t, c = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
        c.append(time.process_time() - c0)
    return statistics.median(t), statistics.median(c)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ft", required=True, help="a checkout of idiap/fast-transformers")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--len", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-dir", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"eformer-ft-build-{os.getuid()}"),
        help="where causal_product_cpu is compiled when the checkout has no build of it")
    ap.add_argument("--json", action="store_true", help="also one JSON line at the end")
    ap.add_argument("--no-malloc-keep", dest="malloc_keep", action="store_false",
                    help="leave glibc malloc's defaults (by default it is told to keep freed "
                    "memory, as torch_twin.py does, for both sides)")
    a = ap.parse_args()
    # OPENBLAS_CORETYPE (as eformer and torch_twin.py) and, unless --no-malloc-keep, glibc
    # malloc keeping freed memory: both sides allocate their outputs and gradients (tens of MB)
    # every pass, and with the default thresholds every pass page-faults them in again. glibc
    # reads MALLOC_* at start-up only: when they had to be set, the script re-executes itself.
    if any(k.startswith("MALLOC_") for k in prepare_env(os.environ, a.malloc_keep)):
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    import torch
    import eformer
    import eformer.torch as et
    torch.set_num_threads(a.threads)
    eformer.set_num_threads(a.threads)
    cls, masking, how = import_ft(a.ft, a.causal, a.build_dir)
    errs = compare_small(torch, et, cls, masking, a.causal)
    print(f"# fast-transformers from {os.path.abspath(a.ft)} ({how})")
    print("# same function (B=2 H=3 L=300 E=20): max relative difference " +
          ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    if max(errs.values()) > 1e-4:
        sys.exit("fast_transformers_linear: the two differ; not timing them")

    B, H, N, D = a.batch, a.heads, a.len, a.dim
    g = torch.Generator().manual_seed(1)
    # eformer's layout (B, H, N, D); ft gets its own layout (N, L, H, E) as contiguous tensors
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    fq, fk, fv, fdout = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    eq, ek, ev = (t.requires_grad_() for t in (q, k, v))
    fq, fk, fv = (t.requires_grad_() for t in (fq, fk, fv))
    ft_run = make_ft(torch, cls, masking, B, N, D, a.causal)
    spec = "linear:causal=1" if a.causal else "linear"

    def run_ft():
        for t in (fq, fk, fv):
            t.grad = None
        ft_run(fq, fk, fv).backward(fdout)

    def run_eformer():
        for t in (eq, ek, ev):
            t.grad = None
        et.attention(eq, ek, ev, spec=spec).backward(dout)

    res = {"ft": [], "eformer": []}
    cpu = {"ft": [], "eformer": []}
    loads = []
    for _ in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for n, fn in (("ft", run_ft), ("eformer", run_eformer)):
            t, c = median_time(fn, a.reps)
            res[n].append(t)
            cpu[n].append(c)
    med = {n: statistics.median(ts) for n, ts in res.items()}
    cmed = {n: statistics.median(ts) for n, ts in cpu.items()}
    pair = [f / e for f, e in zip(res["ft"], res["eformer"])]
    print(f"# forward+backward, linear{' causal' if a.causal else ''}, B={B} H={H} N={N} D={D}, "
          f"{a.threads} threads, torch {torch.__version__}, blas {loaded_blas()}, malloc keep "
          f"{'on' if 'MALLOC_MMAP_MAX_' in os.environ else 'off'}, "
          f"median of {a.reps} reps per round, 1-min load before each round: "
          + " ".join(f"{x:.2f}" for x in loads))
    for n, ts in res.items():
        print(f"{n:8s} " + "  ".join(f"{t * 1e3:9.1f}" for t in ts) +
              f"   median {med[n] * 1e3:9.1f} ms   (CPU time {cmed[n] * 1e3:.1f} ms)")
    print(f"ft / eformer = {med['ft'] / med['eformer']:.2f} (medians); per round "
          + " ".join(f"{r:.2f}" for r in pair) + f", median {statistics.median(pair):.2f}; "
          f"CPU time {cmed['ft'] / cmed['eformer']:.2f}")
    if a.json:
        print(json.dumps({"batch": B, "heads": H, "len": N, "dim": D, "causal": a.causal,
                          "threads": a.threads, "torch": torch.__version__,
                          "malloc_keep": "MALLOC_MMAP_MAX_" in os.environ,
                          "ft_ms": [t * 1e3 for t in res["ft"]],
                          "eformer_ms": [t * 1e3 for t in res["eformer"]],
                          "ft_median_ms": med["ft"] * 1e3,
                          "eformer_median_ms": med["eformer"] * 1e3,
                          "ratio": med["ft"] / med["eformer"], "round_ratios": pair,
                          "ft_cpu_ms": [t * 1e3 for t in cpu["ft"]],
                          "eformer_cpu_ms": [t * 1e3 for t in cpu["eformer"]],
                          "cpu_ratio": cmed["ft"] / cmed["eformer"], "check": errs,
                          "loads": loads}))


if __name__ == "__main__":
    main()
