#!/usr/bin/python3
"""python_attention.py - forward+backward of attention from PyTorch, in one run:

  eformer  eformer.torch.attention(q, k, v, spec) (the binding, autograd)
  direct   the C library without Python: `eformer bench --spec SPEC --backward --json`
  torch    PyTorch's own attention: softmax(q k^T / sqrt(D)) v with autograd, as
           torch.nn.MultiheadAttention computes it in 1.13 (which has no fused CPU kernel)

Each is timed as the median of --reps runs after a warm-up, alternating --rounds times; the
figures are tokens per second and the ratios eformer/torch and eformer/direct.

    /usr/bin/python3 bench/python_attention.py [--len 4096] [--heads 8] [--dim 64] [--spec flash]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

import eformer  # noqa: E402
import eformer.torch as et  # noqa: E402


def median_time(fn, reps):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--spec", default="flash")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--eformer", default=os.path.join(HERE, "..", "build", "eformer"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eformer.set_num_threads(a.threads)
    B, H, N, D = a.batch, a.heads, a.len, a.dim
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, N, D, generator=g)

    def run_eformer():
        out = et.attention(q, k, v, spec=a.spec)
        out.backward(dout)

    causal = "causal=1" in a.spec

    def run_torch():
        s = (q @ k.transpose(-1, -2)) * (D ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(s, -1) @ v
        out.backward(dout)

    def run_direct():
        r = subprocess.run([a.eformer, "bench", "--spec", a.spec, "--batch", str(B), "--heads",
                            str(H), "--len", str(N), "--dim", str(D), "--backward", "--reps",
                            str(a.reps), "--warmup", "1", "--threads", str(a.threads), "--json",
                            "--no-check"], check=True, capture_output=True, text=True)
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        return rec["median_ms"] / 1e3, rec.get("sgemm_gflops")

    res = {"eformer": [], "torch": [], "direct": []}
    sgemm = []
    for _ in range(a.rounds):
        res["eformer"].append(median_time(run_eformer, a.reps))
        res["torch"].append(median_time(run_torch, a.reps))
        t, sg = run_direct()
        res["direct"].append(t)
        sgemm.append(sg)
    tok = B * N
    print(f"# forward+backward, {a.spec}, B={B} H={H} N={N} D={D}, {a.threads} threads, "
          f"torch {torch.__version__}, sgemm {min(sgemm):.0f}-{max(sgemm):.0f} GFLOP/s")
    for name, ts in res.items():
        print(f"{name:8s} " + "  ".join(f"{t * 1e3:9.1f} ms ({tok / t:8.0f} tok/s)" for t in ts))
    e, t, d = (min(res[n]) for n in ("eformer", "torch", "direct"))
    print(f"eformer.torch vs torch: {t / e:.2f}x faster; vs the C library directly: "
          f"{(e / d - 1) * 100:+.1f}% time (best of {a.rounds} rounds each)")


if __name__ == "__main__":
    main()
