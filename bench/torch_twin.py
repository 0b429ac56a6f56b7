#!/usr/bin/python3
"""torch_twin.py - eformer's Transformer (ef_model) written in plain PyTorch, to compare
training tokens/s with `eformer bench --model` on the same machine in one run.

The model is the one of include/eformer.h ("The Transformer model"), docs/model.md and
docs/nn.md, for a subset of the spec grammar:

    x = embed[tokens] * s + pos             pos: sinusoidal (default; s = sqrt(dim)),
                                            learned or none (s = 1)
    h = x + Attn(LN1(x));  x = h + FFN(LN2(h))       for every layer (pre-LN, reversible=0)
    z = LN_f(x) Wh + bh;   loss = mean cross-entropy over the counted targets (head=lm)

Attn: Q, K, V, O linear layers with biases, heads split the width in contiguous slices,
softmax(Q K^T * scale) V with scale = 1/sqrt(head_dim) unless the spec sets scale=.
FFN: fc2(gelu_tanh(fc1(x))), biases on both. LN: eps = ln_eps (1e-5), gain and bias.
Init (as src/model/model.c): every weight matrix and the embedding N(0, 0.02), the attention
output and fc2 weights N(0, 0.02 / sqrt(2 layers)), biases 0, LN gains 1. The values differ
from eformer's (its Philox streams), the distribution is the same.

A timed step is what `eformer bench --model --backward` times: forward with targets (the loss),
zero_grad, backward; tokens/s = batch * len / median step. Tokens come from a fixed seed, the
targets are the next token, none (-1) at the last position.

Run with Debian's Python (python3-torch is installed for /usr/bin/python3):
    /usr/bin/python3 bench/torch_twin.py --model SPEC [--len N] [--batch B] [--reps R] ...
    /usr/bin/python3 bench/torch_twin.py --compare --model SPEC --len N --batch B --reps R
See bench/README.md.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

DATA_SEED = 2024  # eformer bench's input seed (a different generator: the tokens differ)

MODEL_KEYS = ("layers", "dim", "heads", "ff", "vocab", "max_len", "ln_eps", "pos",
              "axial_shape", "axial_dims", "attn", "reversible", "chunks", "head")
MECHANISMS = ("flash", "full", "local")


class SpecError(Exception):
    pass


# ------------------------------------------------------------------------------------------
# The spec (no torch needed: --compare parses it before starting anything)
# ------------------------------------------------------------------------------------------
def _int_in(key, v, lo, hi):
    if not re.fullmatch(r"[0-9]+", v):
        raise SpecError(f"model spec: {key}={v} is not an integer")
    n = int(v)
    if not lo <= n <= hi:
        raise SpecError(f"model spec: {key}={v} is outside [{lo}, {hi}]")
    return n


def parse_attn(s):
    """One attention spec 'name[:opt=v,...]' -> dict(name, causal, window, scale)."""
    name, _, opts = s.partition(":")
    name = name.strip()
    if name not in MECHANISMS:
        raise SpecError(
            f"attention '{name}': the twin implements {', '.join(MECHANISMS)} only "
            f"(eformer has more: `eformer info --mechanisms`)")
    a = {"name": name, "causal": 0, "window": 256 if name == "local" else None, "scale": None}
    for o in filter(None, (x.strip() for x in opts.split(","))):
        k, eq, v = o.partition("=")
        if not eq or not v:
            raise SpecError(f"attention '{s}': option '{o}' is not key=value")
        if k == "causal":
            a["causal"] = _int_in("causal", v, 0, 1)
        elif k == "window" and name == "local":
            a["window"] = _int_in("window", v, 1, 1 << 30)
        elif k == "scale":
            if v != "auto":
                try:
                    a["scale"] = float(v)
                except ValueError:
                    raise SpecError(f"attention '{s}': scale={v} is not a number or auto")
        elif k == "seed":
            pass  # flash, full and local draw nothing
        elif k == "ref":
            _int_in("ref", v, 0, 1)  # eformer's slow reference path: the same function
        else:
            raise SpecError(f"attention '{s}': unknown option '{k}' for {name}")
    return a


def attn_describe(a):
    s = a["name"]
    if a["name"] == "local":
        s += f":window={a['window']},causal={a['causal']}"
    else:
        s += f":causal={a['causal']}"
    return s + ",scale=" + ("auto" if a["scale"] is None else repr(a["scale"]))


def parse_spec(spec):
    """eformer's model spec grammar (src/model/model.c) -> cfg dict; SpecError for what the
    twin does not implement."""
    c = {"layers": 2, "dim": 256, "heads": 4, "ff": 0, "vocab": 256, "max_len": 1024,
         "ln_eps": 1e-5, "pos": "sinusoidal", "reversible": 0, "chunks": 1, "head": "lm"}
    raw = {"attn": None, "head": None}
    open_key = None
    for item in spec.split(","):
        it = item.strip()
        if not it:
            continue
        key = it.split("=", 1)[0]
        if key not in MODEL_KEYS:
            if open_key is None:
                raise SpecError(f"model spec: unknown key '{it}' (model keys: "
                                f"{', '.join(MODEL_KEYS)})")
            raw[open_key] += "," + it  # an option of the attention or head spec before it
            continue
        open_key = None
        k, eq, v = it.partition("=")
        if not eq or not v:
            raise SpecError(f"model spec: '{it}' is not key=value")
        if k in ("attn", "head"):
            if raw[k] is not None:
                raise SpecError(f"model spec: {k}= given twice")
            raw[k] = v
            open_key = k
        elif k == "layers":
            c[k] = _int_in(k, v, 1, 1024)
        elif k == "dim":
            c[k] = _int_in(k, v, 1, 65536)
        elif k == "heads":
            c[k] = _int_in(k, v, 1, 4096)
        elif k == "ff":
            c[k] = _int_in(k, v, 1, 1 << 20)
        elif k == "vocab":
            c[k] = _int_in(k, v, 1, 1 << 24)
        elif k == "max_len":
            c[k] = _int_in(k, v, 1, 1 << 24)
        elif k == "chunks":
            c[k] = _int_in(k, v, 1, 1 << 24)
        elif k == "reversible":
            c[k] = _int_in(k, v, 0, 1)
        elif k == "ln_eps":
            try:
                e = float(v)
            except ValueError:
                e = -1.0
            if not 0 < e <= 1:
                raise SpecError(f"model spec: ln_eps={v} must be a number in (0, 1]")
            c[k] = e
        elif k == "pos":
            if v not in ("sinusoidal", "learned", "none", "axial"):
                raise SpecError(f"model spec: pos={v} is not sinusoidal, learned, axial or none")
            c[k] = v
        elif k in ("axial_shape", "axial_dims"):
            raise SpecError(f"model spec: {k}: the twin does not implement pos=axial")
    if c["ff"] == 0:
        c["ff"] = 4 * c["dim"]
    if c["dim"] % c["heads"]:
        raise SpecError(f"model spec: dim={c['dim']} is not a multiple of heads={c['heads']}")
    if c["reversible"]:
        raise SpecError("model spec: reversible=1 (RevNet layers) is not implemented in the "
                        "twin; it has pre-LN residual layers only (reversible=0)")
    if c["pos"] == "axial":
        raise SpecError("model spec: pos=axial is not implemented in the twin "
                        "(sinusoidal, learned or none)")
    head = raw["head"] or "lm"
    if head != "lm":
        raise SpecError(f"model spec: head={head}: the twin implements head=lm only")
    attn = raw["attn"] or "flash"
    c["attn"] = [parse_attn(a) for a in attn.split("|")]
    if any(not a.strip() for a in attn.split("|")):
        raise SpecError(f"model spec: attn={attn} has an empty attention spec")
    if len({a["causal"] for a in c["attn"]}) > 1:
        raise SpecError("model spec: all attention specs must agree on causal (as eformer)")
    c["causal"] = c["attn"][0]["causal"]
    return c


def describe(c):
    """The twin's canonical spec, in eformer's key order (eformer's also lists ref=0)."""
    return (f"layers={c['layers']},dim={c['dim']},heads={c['heads']},ff={c['ff']},"
            f"vocab={c['vocab']},max_len={c['max_len']},ln_eps={c['ln_eps']:g},pos={c['pos']},"
            f"attn={'|'.join(attn_describe(a) for a in c['attn'])},reversible=0,"
            f"chunks={c['chunks']},head=lm")


def param_count(c):
    """Learned parameters, counted as eformer counts them (ef_model_param_count)."""
    C, F, V, L = c["dim"], c["ff"], c["vocab"], c["layers"]
    per_layer = 4 * (C * C + C) + 2 * 2 * C + (C * F + F) + (F * C + C)
    pos = c["max_len"] * C if c["pos"] == "learned" else 0
    return V * C + pos + L * per_layer + 2 * C + (C * V + V)


# ------------------------------------------------------------------------------------------
# Environment set before torch loads
# ------------------------------------------------------------------------------------------
def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def prepare_env(env, malloc_keep):
    """What eformer does for OpenBLAS (docs/gemm.md: OPENBLAS_CORETYPE=SkylakeX when unset and
    the CPU has AVX-512 F/BW/VL/DQ, else Debian's OpenBLAS 0.3.21 may run SSE3 kernels on
    Sapphire Rapids), and optionally glibc malloc told to keep freed memory (MACHINE.md: PyTorch
    then no longer page-faults its large temporaries in every step). Returns what was set."""
    done = {}
    if "OPENBLAS_CORETYPE" not in env and {"avx512f", "avx512bw", "avx512vl",
                                             "avx512dq"} <= cpu_flags():
        env["OPENBLAS_CORETYPE"] = done["OPENBLAS_CORETYPE"] = "SkylakeX"
    if malloc_keep:
        for k, v in (("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", "18446744073709551615"),
                     ("MALLOC_TOP_PAD_", "268435456")):
            if k not in env:
                env[k] = done[k] = v
    return done


def loaded_blas():
    """The BLAS library file this process has mapped (torch links libblas.so.3)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if path.startswith("/") and "blas" in os.path.basename(path):
                    libs.add(path)
    except OSError:
        return "unknown"
    return ",".join(sorted(libs)) or "none found"


def load_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("torch_twin: cannot import torch in " + sys.executable + ". Install Debian's "
                 "PyTorch (apt-get install python3-torch libopenblas0-openmp) and run this "
                 "script with /usr/bin/python3 (a pyenv or venv python3 does not see it).")
    return torch


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
def build_model(torch, c, local_impl, attn_impl):
    nn, F = torch.nn, torch.nn.functional
    C, H = c["dim"], c["heads"]
    D = C // H
    has_sdpa = hasattr(F, "scaled_dot_product_attention")

    def dense_mask(a, n):
        """Boolean [n][n], True where the pair is HIDDEN (query i, key j)."""
        i = torch.arange(n).view(n, 1)
        j = torch.arange(n).view(1, n)
        if a["name"] == "local":
            if a["causal"]:
                vis = (j <= i) & (j > i - a["window"])           # i - W < j <= i
            else:
                vis = (j - i).abs() <= a["window"] // 2           # |i - j| <= floor(W/2)
        else:
            vis = j <= i if a["causal"] else torch.ones(n, n, dtype=torch.bool)
        return ~vis

    class Attention(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a = a
            self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
            self.masks = {}
            if a["name"] == "local" and local_impl == "blocks":
                self.impl = "blocks"
            elif attn_impl == "auto":
                self.impl = "sdpa" if has_sdpa else "explicit"
            else:
                self.impl = attn_impl
            if self.impl == "sdpa" and not has_sdpa:
                raise SystemExit(f"torch_twin: torch {torch.__version__} has no "
                                 "scaled_dot_product_attention (added in 2.0): use "
                                 "--attn-impl explicit or auto")
            self.scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(D)

        def mask(self, n, key=None):
            key = key or n
            if key not in self.masks:
                self.masks[key] = dense_mask(self.a, n) if isinstance(key, int) \
                    else self.block_mask(n)
            return self.masks[key]

        def block_mask(self, n):
            """Hidden pairs of the blocked local attention, [nb][S][span]."""
            S, L, R = self.block_geometry()
            nb = -(-n // S)
            b = torch.arange(nb).view(nb, 1, 1)
            r = torch.arange(S).view(1, S, 1)
            col = torch.arange(S + L + R).view(1, 1, S + L + R)
            i = b * S + r
            j = b * S - L + col
            d = j - i
            W = self.a["window"]
            band = (d <= 0) & (d > -W) if self.a["causal"] else d.abs() <= W // 2
            # padded keys (j < 0, j >= n) are hidden from the valid queries; the padded queries
            # (i >= n, dropped afterwards) may see them, so that no row is empty (NaN)
            inside = (j >= 0) & ((j < n) | (i >= n))
            return ~(band & inside)

        def block_geometry(self):
            W = self.a["window"]
            if self.a["causal"]:
                return W, W - 1, 0                  # block S = W; keys from W-1 before to 0 after
            h = W // 2
            return max(h, 1), h, h

        def blocks(self, q, k, v):
            """Local attention in blocks of S queries against their S + L + R keys (the window
            around the block), a standard chunked sliding window: O(N (S+L+R)) not O(N^2)."""
            B_, H_, n, D_ = q.shape
            S, L, R = self.block_geometry()
            nb = -(-n // S)
            pad = nb * S - n
            qb = F.pad(q, (0, 0, 0, pad)).view(B_, H_, nb, S, D_)
            kb = F.pad(k, (0, 0, L, pad + R)).unfold(2, S + L + R, S)   # [B,H,nb,D,span]
            vb = F.pad(v, (0, 0, L, pad + R)).unfold(2, S + L + R, S)
            s = torch.matmul(qb * self.scale, kb)                        # [B,H,nb,S,span]
            s.masked_fill_(self.mask(n, ("blocks", n)), float("-inf"))
            p = torch.softmax(s, dim=-1)
            o = torch.matmul(p, vb.transpose(-1, -2))                    # [B,H,nb,S,D]
            return o.reshape(B_, H_, nb * S, D_)[:, :, :n]

        def forward(self, x):
            B_, n, _ = x.shape
            q = self.q(x).view(B_, n, H, D).transpose(1, 2)   # [B][H][N][D]
            k = self.k(x).view(B_, n, H, D).transpose(1, 2)
            v = self.v(x).view(B_, n, H, D).transpose(1, 2)
            if self.impl == "blocks":
                o = self.blocks(q, k, v)
            elif self.impl == "sdpa":
                # sdpa's default scale is 1/sqrt(D); another scale is folded into q
                if self.a["scale"] is not None:
                    q = q * (self.scale * math.sqrt(D))
                if self.a["name"] == "local":
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=~self.mask(n))
                else:
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(self.a["causal"]))
            else:
                s = torch.matmul(q * self.scale, k.transpose(-1, -2))  # [B][H][N][N]
                if self.a["causal"] or self.a["name"] == "local":
                    s.masked_fill_(self.mask(n), float("-inf"))
                o = torch.matmul(torch.softmax(s, dim=-1), v)
            return self.o(o.transpose(1, 2).reshape(B_, n, C))

    class Layer(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.ln1 = nn.LayerNorm(C, eps=c["ln_eps"])
            self.attn = Attention(a)
            self.ln2 = nn.LayerNorm(C, eps=c["ln_eps"])
            self.fc1 = nn.Linear(C, c["ff"])
            self.fc2 = nn.Linear(c["ff"], C)

        def forward(self, x):
            h = x + self.attn(self.ln1(x))
            return h + self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(c["vocab"], C)
            if c["pos"] == "learned":
                self.pos = nn.Parameter(torch.empty(c["max_len"], C))
            else:
                self.pos = None
                if c["pos"] == "sinusoidal":
                    # pe[t][2i] = sin(t / 10000^(2i/C)), pe[t][2i+1] = cos(...), in double
                    t = torch.arange(c["max_len"], dtype=torch.float64).view(-1, 1)
                    jj = torch.arange(C)
                    ang = t * torch.exp(-math.log(10000.0) * (jj - (jj % 2)).double() / C)
                    pe = torch.where(jj % 2 == 1, torch.cos(ang), torch.sin(ang)).float()
                    self.register_buffer("pe", pe, persistent=False)
            self.layers = nn.ModuleList(Layer(c["attn"][l % len(c["attn"])])
                                        for l in range(c["layers"]))
            self.ln_f = nn.LayerNorm(C, eps=c["ln_eps"])
            self.head = nn.Linear(C, c["vocab"])  # untied
            self.init_params()

        @torch.no_grad()
        def init_params(self):
            std, ostd = 0.02, 0.02 / math.sqrt(2.0 * c["layers"])
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, std)
                    m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            self.embed.weight.normal_(0.0, std)
            if self.pos is not None:
                self.pos.normal_(0.0, std)
            for l in self.layers:
                l.attn.o.weight.normal_(0.0, ostd)
                l.fc2.weight.normal_(0.0, ostd)

        def forward(self, tokens, targets):
            n = tokens.shape[1]
            x = self.embed(tokens)
            if self.pos is not None:
                x = x + self.pos[:n]
            elif c["pos"] == "sinusoidal":
                x = x * math.sqrt(C) + self.pe[:n]  # Vaswani et al.: embed * sqrt(C) + pos
            for l in self.layers:
                x = l(x)
            z = self.head(self.ln_f(x))
            return F.cross_entropy(z.reshape(-1, c["vocab"]), targets.reshape(-1),
                                   ignore_index=-1)

    m = Model()
    impls = sorted({l.attn.impl for l in m.layers})
    return m, ",".join(impls)


# ------------------------------------------------------------------------------------------
# Timing one configuration in this process
# ------------------------------------------------------------------------------------------
def run_twin(args, c):
    torch = load_torch()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, impl = build_model(torch, c, args.local_impl, args.attn_impl)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != param_count(c):
        print(f"torch_twin: warning: {n_params} parameters, the formula says {param_count(c)}",
              file=sys.stderr)
    B, N = args.batch, args.len
    g = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randint(0, c["vocab"], (B, N), generator=g)
    targets = torch.full((B, N), -1, dtype=torch.long)
    targets[:, :-1] = tokens[:, 1:]  # next token; the last position has none
    backward = not args.forward

    def step():
        if not backward:
            with torch.no_grad():
                return model(tokens, targets)
        loss = model(tokens, targets)
        model.zero_grad(set_to_none=False)  # eformer: ef_model_zero_grad (a memset)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": describe(c), "impl": "torch", "torch": torch.__version__,
        "params": n_params, "batch": B, "len": N, "max_len": c["max_len"], "valid_len": N,
        "seed": args.seed, "pass": "fwdbwd" if backward else "fwd",
        "median_ms": med * 1e3, "tokens_per_s": B * N / med if med > 0 else None,
        "loss": float(loss), "rss_bytes": rss, "threads": torch.get_num_threads(),
        "reps": args.reps, "warmup": args.warmup, "attn_impl": impl,
        "blas": loaded_blas(), "times_ms": [t * 1e3 for t in times],
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "MALLOC_MMAP_MAX_",
                                           "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                                           "OMP_NUM_THREADS") if k in os.environ},
    }


def print_twin(r, as_json):
    if as_json:
        print(json.dumps(r))
        return
    print(f"# twin (PyTorch {r['torch']}, attention {r['attn_impl']}, BLAS {r['blas']}, "
          f"{r['threads']} threads)")
    print(f"# model: {r['model']}")
    print(f"# parameters: {r['params']} ({r['params'] * 4 / 1e6:.1f} MB fp32); seed {r['seed']}")
    print(f"# median of {r['reps']} step(s) after {r['warmup']} warm-up; a step = "
          + ("forward + zero_grad + backward" if r["pass"] == "fwdbwd" else "forward"))
    print(f"{'B':>3} {'N':>6} {'pass':<6} {'median_ms':>10} {'tok/s':>9} {'loss':>8} "
          f"{'RSS_MB':>8}")
    print(f"{r['batch']:>3} {r['len']:>6} {r['pass']:<6} {r['median_ms']:>10.3f} "
          f"{r['tokens_per_s']:>9.0f} {r['loss']:>8.4f} {r['rss_bytes'] / 1e6:>8.1f}")


# ------------------------------------------------------------------------------------------
# --compare: eformer and the twin alternately, each in a fresh process
# ------------------------------------------------------------------------------------------
def last_json(out):
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run_child(cmd, env, what):
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = last_json(p.stdout) if p.returncode == 0 else None
    if r is None:
        sys.stderr.write(p.stderr)
        sys.exit(f"torch_twin: {what} failed (exit {p.returncode}): {' '.join(cmd)}")
    for line in p.stderr.splitlines():
        print(f"  [{what} stderr] {line}")
    r["load1_before"] = load
    return r


def compare(args, c):
    common = ["--len", str(args.len), "--batch", str(args.batch), "--reps", str(args.reps),
              "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--seed", str(args.seed), "--json"]
    ef_cmd = [args.eformer, "bench", "--model", args.model] + common
    if not args.forward:
        ef_cmd.append("--backward")
    tw_cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model,
              "--local-impl", args.local_impl, "--attn-impl", args.attn_impl] + common
    if args.forward:
        tw_cmd.append("--forward")
    if not args.malloc_keep:
        tw_cmd.append("--no-malloc-keep")
    tw_env = dict(os.environ)
    prepare_env(tw_env, args.malloc_keep)
    ef_env = dict(os.environ)  # eformer sets what it needs itself
    print(f"# eformer: {' '.join(ef_cmd)}")
    print(f"# twin:    {' '.join(tw_cmd)}")
    rows = {"eformer": [], "twin": []}
    for r in range(args.rounds):
        for who, cmd, env in (("eformer", ef_cmd, ef_env), ("twin", tw_cmd, tw_env)):
            res = run_child(cmd, env, who)
            rows[who].append(res)
            extra = (f"attn share {res.get('attn_share')}, sgemm {res.get('sgemm_gflops')} GF/s"
                     if who == "eformer" else f"attention {res['attn_impl']}, torch "
                     f"{res['torch']}")
            print(f"round {r + 1} {who:<7}: {res['tokens_per_s']:>9.0f} tok/s  median "
                  f"{res['median_ms']:9.1f} ms  loss {res['loss']:.4f}  params {res['params']}  "
                  f"RSS {res['rss_bytes'] / 1e6:.0f} MB  load1 {res['load1_before']:.2f}  "
                  f"({extra})")
            sys.stdout.flush()
    ef = statistics.median(x["tokens_per_s"] for x in rows["eformer"])
    tw = statistics.median(x["tokens_per_s"] for x in rows["twin"])
    pe, pt = rows["eformer"][0]["params"], rows["twin"][0]["params"]
    print(f"eformer {ef:.0f} tok/s, twin {tw:.0f} tok/s (medians over {args.rounds} rounds); "
          f"eformer / twin = {ef / tw:.2f}")
    print(f"params: eformer {pe}, twin {pt} " + ("(equal)" if pe == pt else "(MISMATCH)"))
    if args.json:
        print(json.dumps({"spec": args.model, "eformer_tokens_per_s": ef,
                          "twin_tokens_per_s": tw, "ratio": ef / tw, "params_eformer": pe,
                          "params_twin": pt, "rounds": rows}))
    return 0 if pe == pt else 1


# ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(
        description="eformer's ef_model in plain PyTorch: time training steps like "
                    "`eformer bench --model SPEC --backward`, or both alternately (--compare).")
    ap.add_argument("--model", required=True, help="eformer model spec (include/eformer.h); "
                    "subset: layers dim heads ff vocab max_len ln_eps pos=sinusoidal|learned|"
                    "none attn=flash|full|local[:window=W,causal=0|1,scale=S] (| cycles) "
                    "chunks reversible=0 head=lm")
    ap.add_argument("--len", type=int, default=0, help="positions per sequence (default max_len)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed steps; the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps before them (default 1)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads (and eformer --threads); default: processors")
    ap.add_argument("--seed", type=int, default=1, help="parameter seed (torch.manual_seed)")
    ap.add_argument("--json", action="store_true", help="one JSON object (keys as eformer "
                    "bench --model where they mean the same)")
    ap.add_argument("--backward", action="store_true",
                    help="accepted for eformer's command line; a training step is the default")
    ap.add_argument("--forward", action="store_true", help="time forward only (no_grad)")
    ap.add_argument("--attn-impl", choices=("auto", "sdpa", "explicit"), default="auto",
                    help="flash/full and local with --local-impl mask: auto = "
                    "F.scaled_dot_product_attention when torch has it (2.0+), else explicit "
                    "softmax(Q K^T scale) V with the causal or banded mask")
    ap.add_argument("--local-impl", choices=("mask", "blocks"), default="mask",
                    help="local: mask = dense N x N scores with a banded mask (default); "
                    "blocks = chunked sliding window, O(N W)")
    ap.add_argument("--no-malloc-keep", dest="malloc_keep", action="store_false",
                    help="leave glibc malloc's defaults (by default the twin re-executes itself "
                    "with MALLOC_MMAP_MAX_=0 and no trimming, so freed memory is reused)")
    ap.add_argument("--compare", action="store_true",
                    help="run eformer bench and the twin alternately and print both")
    ap.add_argument("--rounds", type=int, default=2,
                    help="--compare: eformer, twin rounds (default 2)")
    ap.add_argument("--eformer",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                         "build", "eformer"),
                    help="--compare: the eformer binary (default: build/eformer beside bench/)")
    args = ap.parse_args()
    try:
        c = parse_spec(args.model)
    except SpecError as e:
        sys.exit(f"torch_twin: {e}")
    args.len = args.len or c["max_len"]
    if not 1 <= args.len <= c["max_len"]:
        sys.exit(f"torch_twin: --len {args.len} is beyond the spec's max_len={c['max_len']}")
    for k in ("batch", "reps", "threads", "rounds"):
        if getattr(args, k) < 1:
            sys.exit(f"torch_twin: --{k} must be >= 1")
    if args.warmup < 0:
        sys.exit("torch_twin: --warmup must be >= 0")
    if args.compare:
        sys.exit(compare(args, c))
    # OPENBLAS_CORETYPE works from here (torch, hence OpenBLAS, is not loaded yet); glibc reads
    # MALLOC_* only at start-up, so when they had to be set the script re-executes itself once
    if any(k.startswith("MALLOC_") for k in prepare_env(os.environ, args.malloc_keep)):
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    if c["chunks"] != 1:
        print(f"torch_twin: note: chunks={c['chunks']} is eformer's memory-only feed-forward "
              "chunking; the twin runs the feed-forward unchunked (the same function)",
              file=sys.stderr)
    print_twin(run_twin(args, c), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
