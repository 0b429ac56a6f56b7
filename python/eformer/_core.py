"""The ctypes layer over libeformer and the numpy API (docs/python.md).

Nothing here copies a tensor the caller passes in the right form (float32, C-contiguous): the
library reads the caller's memory and writes into arrays allocated here. Anything else is an
error that says what to do (np.ascontiguousarray, .astype(np.float32)), never a silent copy.
"""
import ctypes
import ctypes.util
import json
import os
import struct
import sys
import weakref

import numpy as np

# ------------------------------------------------------------------------------------------
# Loading the library
# ------------------------------------------------------------------------------------------
_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates():
    env = os.environ.get("EFORMER_LIB")
    if env:
        yield env
        return
    for d in (_HERE, os.path.join(_HERE, "..", "..", "build")):
        for name in ("libeformer.so", "libeformer.so.0", "libeformer.dylib"):
            yield os.path.normpath(os.path.join(d, name))
    found = ctypes.util.find_library("eformer")
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise ImportError(
        "eformer: libeformer not found. Build it (./run.sh test, or cmake -S . -B build && "
        "cmake --build build) so that build/libeformer.so exists beside python/, or set "
        "EFORMER_LIB=/path/to/libeformer.so. Tried: " + "; ".join(tried))


_lib, LIBRARY_PATH = _load()

c_float_p = ctypes.POINTER(ctypes.c_float)
c_int32_p = ctypes.POINTER(ctypes.c_int32)


class _Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("batch", "heads", "q_len", "kv_len", "head_dim",
                                             "v_dim")]


class _IO(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("kv_lens", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("q_lens", ctypes.c_void_p)]


class _Caps(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("causal", "cross", "decode", "params", "exact",
                                             "random", "discrete", "deterministic",
                                             "shared_qk")]


class _ModelOpts(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int), ("seed", ctypes.c_uint64), ("train", ctypes.c_int)]


class _ModelInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("layers", "dim", "heads", "ff", "vocab", "max_len",
                                             "classes", "causal", "reversible", "batch", "len",
                                             "train")]


class _ModelBatch(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int), ("len", ctypes.c_int), ("tokens", ctypes.c_void_p),
                ("lens", ctypes.c_void_p), ("targets", ctypes.c_void_p),
                ("no_grad", ctypes.c_int)]


class _ModelOut(ctypes.Structure):
    _fields_ = [("logits", ctypes.c_void_p), ("loss", ctypes.c_double),
                ("count", ctypes.c_int64), ("correct", ctypes.c_int64)]


def _fn(name, res, *args):
    f = getattr(_lib, name)
    f.restype, f.argtypes = res, list(args)
    return f


_P = ctypes.c_void_p
_S = ctypes.c_int  # ef_status
ef_version = _fn("ef_version", ctypes.c_char_p)
ef_status_str = _fn("ef_status_str", ctypes.c_char_p, ctypes.c_int)
ef_last_error = _fn("ef_last_error", ctypes.c_char_p)
ef_malloc = _fn("ef_malloc", _P, ctypes.c_size_t)
ef_free = _fn("ef_free", None, _P)
ef_set_num_threads = _fn("ef_set_num_threads", None, ctypes.c_int)
ef_get_num_threads = _fn("ef_get_num_threads", ctypes.c_int)
ef_attn_new = _fn("ef_attn_new", _S, ctypes.POINTER(_P), ctypes.c_char_p, ctypes.POINTER(_Shape))
ef_attn_free = _fn("ef_attn_free", None, _P)
ef_attn_describe = _fn("ef_attn_describe", ctypes.c_char_p, _P)
ef_attn_get_caps = _fn("ef_attn_get_caps", _S, ctypes.c_char_p, ctypes.POINTER(_Caps))
ef_attn_saved_bytes = _fn("ef_attn_saved_bytes", ctypes.c_size_t, _P)
ef_attn_workspace_bytes = _fn("ef_attn_workspace_bytes", ctypes.c_size_t, _P)
ef_attn_flops = _fn("ef_attn_flops", ctypes.c_double, _P, ctypes.c_int)
ef_attn_visible = _fn("ef_attn_visible", ctypes.c_int, _P, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int)
ef_attn_forward = _fn("ef_attn_forward", _S, _P, ctypes.POINTER(_IO), _P)
ef_attn_backward = _fn("ef_attn_backward", _S, _P, ctypes.POINTER(_IO), _P, _P, _P, _P, _P)
ef_attn_param_count = _fn("ef_attn_param_count", ctypes.c_size_t, _P)
ef_attn_random_features = _fn("ef_attn_random_features", _S, _P, _P, ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_size_t))
ef_attn_params = _fn("ef_attn_params", _P, _P)
ef_attn_param_grads = _fn("ef_attn_param_grads", _P, _P)
ef_attn_count = _fn("ef_attn_count", ctypes.c_int)
ef_attn_name = _fn("ef_attn_name", ctypes.c_char_p, ctypes.c_int)
ef_model_load = _fn("ef_model_load", _S, ctypes.POINTER(_P), ctypes.c_char_p,
                    ctypes.POINTER(_ModelOpts))
ef_model_free = _fn("ef_model_free", None, _P)
ef_model_describe = _fn("ef_model_describe", ctypes.c_char_p, _P)
ef_model_get_info = _fn("ef_model_get_info", _S, _P, ctypes.POINTER(_ModelInfo))
ef_model_forward = _fn("ef_model_forward", _S, _P, ctypes.POINTER(_ModelBatch),
                       ctypes.POINTER(_ModelOut))

__version__ = ef_version().decode()

# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
STATUS = {0: "EF_OK", 1: "EF_ERR_ARG", 2: "EF_ERR_SHAPE", 3: "EF_ERR_NOMEM", 4: "EF_ERR_IO",
          5: "EF_ERR_FORMAT", 6: "EF_ERR_UNSUPPORTED", 7: "EF_ERR_NUMERIC"}


class EformerError(RuntimeError):
    """A failure the library reported: .status is its name ("EF_ERR_ARG"), the message is
    ef_last_error()'s text naming the bad value."""

    def __init__(self, status, message, context=""):
        self.status = STATUS.get(status, "EF_ERR_UNKNOWN")
        self.message = message
        super().__init__(f"{self.status}: {message}" + (f" ({context})" if context else ""))


def _check(st, context=""):
    if st != 0:
        if st == 3:
            raise MemoryError(f"EF_ERR_NOMEM: {ef_last_error().decode(errors='replace')}")
        raise EformerError(st, ef_last_error().decode(errors="replace"), context)


def set_num_threads(n):
    """Threads of the library's parallel loops and its BLAS (n <= 0: the machine default).
    Results do not depend on it."""
    ef_set_num_threads(int(n))


def get_num_threads():
    return ef_get_num_threads()


def mechanisms():
    """The registered mechanism names."""
    return [ef_attn_name(i).decode() for i in range(ef_attn_count())]


def capabilities(name):
    """A dict of what mechanism `name` can do (ef_attn_get_caps): causal, cross, decode,
    params, exact, random, discrete, deterministic, shared_qk."""
    c = _Caps()
    _check(ef_attn_get_caps(name.encode(), ctypes.byref(c)), f"capabilities of {name!r}")
    return {n: bool(getattr(c, n)) for n, _ in _Caps._fields_}


# ------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------
def _ptr(a):
    return a.ctypes.data if a is not None else None


def check_array(name, a, ndim=4):
    """a must be a C-contiguous float32 numpy array of `ndim` dimensions: returns it; raises
    TypeError / ValueError saying what to do otherwise."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"eformer: {name} must be a numpy.ndarray, not {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"eformer: {name} has dtype {a.dtype}; eformer computes in float32: "
                        f"pass {name}.astype(np.float32)")
    if a.ndim != ndim:
        raise ValueError(f"eformer: {name} has shape {a.shape}; expected {ndim} dimensions "
                         "(batch, heads, length, dim)")
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(f"eformer: {name} is not C-contiguous (a transposed or sliced view?): "
                         f"pass np.ascontiguousarray({name}); eformer reads memory in place "
                         "and makes no hidden copies")
    return a


def _lens(name, x, batch, limit):
    if x is None:
        return None
    a = np.ascontiguousarray(np.asarray(x), dtype=np.int32)
    if a.shape != (batch,):
        raise ValueError(f"eformer: {name} has shape {a.shape}; expected ({batch},): one "
                         "length per sequence")
    if (a < 0).any() or (a > limit).any():
        raise ValueError(f"eformer: {name} = {a.tolist()} must be within [0, {limit}]")
    return a


class _Buffer:
    """ef_malloc'd memory (64-byte aligned, as `saved` must be), freed with the object."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.ptr = ef_malloc(nbytes) if nbytes else None
        if nbytes and not self.ptr:
            raise MemoryError(f"eformer: out of memory for {nbytes} bytes")
        self._fin = weakref.finalize(self, ef_free, self.ptr) if self.ptr else None


# ------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------
class Plan:
    """An attention plan (ef_attn_new): a mechanism spec made for one shape.

    plan = Plan("local:window=64", batch=2, heads=4, q_len=512, head_dim=32)
    out = plan.forward(q, k, v)                     # inference
    out, saved = plan.forward(q, k, v, keep=True)   # keeps what backward needs
    dq, dk, dv = plan.backward(saved, dout)
    """

    def __init__(self, spec, batch, heads, q_len, head_dim, kv_len=None, v_dim=None):
        self.spec = spec
        sh = _Shape(batch, heads, q_len, kv_len or q_len, head_dim, v_dim or head_dim)
        self.shape = (sh.batch, sh.heads, sh.q_len, sh.kv_len, sh.head_dim, sh.v_dim)
        h = _P()
        _check(ef_attn_new(ctypes.byref(h), spec.encode(), ctypes.byref(sh)),
               f"planning {spec!r} for batch={batch} heads={heads} q_len={q_len} "
               f"kv_len={sh.kv_len} head_dim={head_dim} v_dim={sh.v_dim}")
        self._h = h
        self._fin = weakref.finalize(self, ef_attn_free, h)
        self.canonical = ef_attn_describe(h).decode()
        self.name = self.canonical.split(":")[0]
        self.caps = capabilities(self.name)
        self.saved_bytes = ef_attn_saved_bytes(h)
        self.workspace_bytes = ef_attn_workspace_bytes(h)
        self.param_count = ef_attn_param_count(h)

    def __repr__(self):
        return f"eformer.Plan({self.canonical!r}, shape={self.shape})"

    def flops(self, backward=False):
        return ef_attn_flops(self._h, int(bool(backward)))

    # the mechanism's own learned parameters (linformer's projections), views of the plan's
    # buffers: writing params() changes what the plan computes
    def params(self):
        if not self.param_count:
            return np.zeros(0, np.float32)
        p = ctypes.cast(ef_attn_params(self._h), c_float_p)
        return np.ctypeslib.as_array(p, (self.param_count,))

    def param_grads(self):
        if not self.param_count:
            return np.zeros(0, np.float32)
        p = ctypes.cast(ef_attn_param_grads(self._h), c_float_p)
        return np.ctypeslib.as_array(p, (self.param_count,))

    def random_features(self):
        """The random projections the mechanism draws from its seed (performer's W,
        (features, head_dim), one matrix for every head; ef_attn_random_features), for checking
        it against its formula. EformerError (EF_ERR_UNSUPPORTED) for other mechanisms."""
        n = ctypes.c_size_t()
        _check(ef_attn_random_features(self._h, None, 0, ctypes.byref(n)), "random features")
        w = np.empty(n.value, np.float32)
        _check(ef_attn_random_features(self._h, w.ctypes.data, n.value, ctypes.byref(n)),
               "random features")
        return w.reshape(-1, self.shape[4])

    def visible(self, head=0):
        """The pattern as a boolean [q_len][kv_len] matrix (ef_attn_visible: the mechanism's
        pattern and the causal rule; padding is per call). For data-dependent patterns (lsh,
        clustered) only the causal rule."""
        B, H, N, M = self.shape[:4]
        m = np.zeros((N, M), dtype=bool)
        for i in range(N):
            for j in range(M):
                r = ef_attn_visible(self._h, head, i, j)
                if r < 0:
                    _check(1, "ef_attn_visible")
                m[i, j] = r == 1
        return m

    def _io(self, q, k, v, out, kv_lens, q_lens):
        B, H, N, M, D, Dv = self.shape
        for name, a, want in (("q", q, (B, H, N, D)), ("k", k, (B, H, M, D)),
                              ("v", v, (B, H, M, Dv))):
            check_array(name, a)
            if a.shape != want:
                raise ValueError(f"eformer: {name} has shape {a.shape}; the plan {self.canonical!r}"
                                 f" was made for {want} (batch, heads, length, dim)")
        kvl = _lens("kv_lens", kv_lens, B, M)
        ql = _lens("q_lens", q_lens, B, N)
        io = _IO(_ptr(q), _ptr(k), _ptr(v), _ptr(kvl), _ptr(out), _ptr(ql))
        return io, (kvl, ql)

    def forward(self, q, k, v, kv_lens=None, q_lens=None, keep=False, out=None):
        """out [B][H][N][Dv]; with keep=True returns (out, saved) for backward."""
        B, H, N, M, D, Dv = self.shape
        if out is None:
            out = np.empty((B, H, N, Dv), np.float32)
        else:
            check_array("out", out)
        io, keepalive = self._io(q, k, v, out, kv_lens, q_lens)
        saved = _Buffer(self.saved_bytes) if keep else None
        _check(ef_attn_forward(self._h, ctypes.byref(io), saved.ptr if saved else None),
               f"forward of {self.canonical!r}")
        if not keep:
            return out
        saved.io = (q, k, v, out, keepalive)  # backward reads the same tensors
        return out, saved

    def backward(self, saved, dout, dq=None, dk=None, dv=None):
        """dq, dk, dv for the forward that made `saved` (parameter gradients accumulate into
        param_grads())."""
        if not isinstance(saved, _Buffer) or not hasattr(saved, "io"):
            raise TypeError("eformer: backward needs the `saved` that forward(..., keep=True) "
                            "returned")
        q, k, v, out, (kvl, ql) = saved.io
        check_array("dout", dout)
        if dout.shape != out.shape:
            raise ValueError(f"eformer: dout has shape {dout.shape}; the output is {out.shape}")
        dq = np.empty_like(q) if dq is None else check_array("dq", dq)
        dk = np.empty_like(k) if dk is None else check_array("dk", dk)
        dv = np.empty_like(v) if dv is None else check_array("dv", dv)
        io = _IO(_ptr(q), _ptr(k), _ptr(v), _ptr(kvl), _ptr(out), _ptr(ql))
        _check(ef_attn_backward(self._h, ctypes.byref(io), saved.ptr, _ptr(dout), _ptr(dq),
                                _ptr(dk), _ptr(dv)), f"backward of {self.canonical!r}")
        return dq, dk, dv


def _plan_for(spec, q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_array(name, a)
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"eformer: q {q.shape}, k {k.shape}, v {v.shape} do not fit together: "
                         "q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv)")
    return Plan(spec, B, H, N, D, kv_len=k.shape[2], v_dim=v.shape[3])


def attention(q, k, v, spec="flash", kv_lens=None, q_lens=None):
    """softmax attention by mechanism `spec` on numpy float32 (B, H, N, D) arrays: out
    (B, H, N, Dv). kv_lens / q_lens: valid keys / queries per sequence (padding)."""
    return _plan_for(spec, q, k, v).forward(q, k, v, kv_lens, q_lens)


def attention_backward(q, k, v, dout, spec="flash", kv_lens=None, q_lens=None):
    """Forward and backward in one call: (out, dq, dk, dv) for the output gradient dout."""
    plan = _plan_for(spec, q, k, v)
    out, saved = plan.forward(q, k, v, kv_lens, q_lens, keep=True)
    return (out,) + plan.backward(saved, dout)


# ------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32,
           "I64": np.int64, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "BOOL": np.bool_}


def load_safetensors(path, with_metadata=False):
    """A dict name -> numpy array of a safetensors file (eformer's checkpoints, or any);
    with_metadata=True also returns the __metadata__ dict. Arrays are copies."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"eformer: {path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"eformer: {path}: header of {n} bytes claims more than the file "
                             f"holds ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"eformer: {path}: malformed header: {e}") from None
        data = f.read()
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, t in header.items():
        dt = _DTYPES.get(t.get("dtype"))
        if dt is None:
            raise ValueError(f"eformer: {path}: tensor {name!r} has dtype {t.get('dtype')!r}")
        lo, hi = t["data_offsets"]
        shape = tuple(t["shape"])
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= lo <= hi <= len(data) or hi - lo != count * np.dtype(dt).itemsize:
            raise ValueError(f"eformer: {path}: tensor {name!r} offsets {lo}..{hi} do not fit "
                             f"its shape {shape} or the file")
        out[name] = np.frombuffer(data, dtype=np.dtype(dt).newbyteorder("<"), count=count,
                                  offset=lo).reshape(shape).copy()
    return (out, meta) if with_metadata else out


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
class Model:
    """A model `eformer train` saved (ef_model_load), for inference.

    m = eformer.Model.load("run.safetensors", batch=4)
    logits, loss = m(tokens, lens=None, targets=None)   # tokens int (B, N)
    """

    def __init__(self, handle, path, batch):
        self._h = handle
        self._fin = weakref.finalize(self, ef_model_free, handle)
        self.path = path
        self.spec = ef_model_describe(handle).decode()
        info = _ModelInfo()
        _check(ef_model_get_info(handle, ctypes.byref(info)))
        self.info = {n: getattr(info, n) for n, _ in _ModelInfo._fields_}
        self.batch = batch

    @classmethod
    def load(cls, path, batch=1):
        h = _P()
        opts = _ModelOpts(batch, 0, 0)
        _check(ef_model_load(ctypes.byref(h), os.fsencode(path), ctypes.byref(opts)),
               f"loading {path}")
        return cls(h, path, batch)

    def __repr__(self):
        return f"eformer.Model({self.spec!r})"

    def __call__(self, tokens, lens=None, targets=None):
        """logits (B, N, vocab) for head=lm or (B, classes) for head=cls (float32), and the
        mean cross-entropy over the targets (None without targets). Rows past lens are 0."""
        tok = np.ascontiguousarray(np.asarray(tokens), dtype=np.int32)
        if tok.ndim != 2:
            raise ValueError(f"eformer: tokens has shape {tok.shape}; expected (batch, length)")
        B, N = tok.shape
        info = self.info
        if not 1 <= B <= self.batch:
            raise ValueError(f"eformer: {B} sequences; the model was loaded for batch "
                             f"{self.batch} (Model.load(path, batch=...))")
        ln = _lens("lens", lens, B, N)
        tg = None
        if targets is not None:
            tg = np.ascontiguousarray(np.asarray(targets), dtype=np.int32)
            want = (B,) if info["classes"] else (B, N)
            if tg.shape != want:
                raise ValueError(f"eformer: targets has shape {tg.shape}; expected {want}")
        K = info["classes"] or info["vocab"]
        logits = np.zeros((B, K) if info["classes"] else (B, N, K), np.float32)
        batch = _ModelBatch(B, N, _ptr(tok), _ptr(ln), _ptr(tg), 1)
        out = _ModelOut(_ptr(logits), 0.0, 0, 0)
        _check(ef_model_forward(self._h, ctypes.byref(batch), ctypes.byref(out)),
               f"forward of {self.path}")
        return logits, (out.loss if tg is not None else None)
