"""eformer inside PyTorch: an autograd Function over ef_attn_forward / ef_attn_backward, a
drop-in scaled_dot_product_attention and an nn.Module that owns its plan (docs/python.md).

Tensors go to the library by pointer (no copies) when they are float32, on the CPU and
contiguous; attention() refuses anything else with an error saying what to do.
scaled_dot_product_attention() accepts non-contiguous inputs as PyTorch's does (it makes them
contiguous, which copies).
"""
import collections
import ctypes

import numpy as np
import torch

from . import _core
from ._core import EformerError, Plan, capabilities

__all__ = ["attention", "scaled_dot_product_attention", "Attention", "EformerError"]


def _check(name, t, ndim=4):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"eformer: {name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"eformer: {name} has dtype {t.dtype}; eformer computes in float32: "
                        f"pass {name}.float()")
    if t.device.type != "cpu":
        raise ValueError(f"eformer: {name} is on {t.device}; eformer runs on the CPU: pass "
                         f"{name}.cpu()")
    if t.dim() != ndim:
        raise ValueError(f"eformer: {name} has shape {tuple(t.shape)}; expected {ndim} "
                         "dimensions (batch, heads, length, dim)")
    if not t.is_contiguous():
        raise ValueError(f"eformer: {name} is not contiguous (a transposed or sliced view?): "
                         f"pass {name}.contiguous(); eformer reads memory in place and makes "
                         "no hidden copies")
    return t


def _lens(name, x, batch, limit):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return _core._lens(name, x, batch, limit)


def _p(t):
    return t.data_ptr() if t is not None else None


_plans = collections.OrderedDict()  # (spec, shape) -> Plan, the most recent 16


def _plan(spec, q, k, v):
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"eformer: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do "
                         "not fit together: q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv)")
    key = (spec, B, H, N, k.shape[2], D, v.shape[3])
    p = _plans.get(key)
    if p is None:
        p = Plan(spec, B, H, N, D, kv_len=k.shape[2], v_dim=v.shape[3])
        _plans[key] = p
        while len(_plans) > 16:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return p


class _AttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, kvl, ql, params):
        B, H, N, M, D, Dv = plan.shape
        if params is not None:  # the module's parameters into the plan
            plan.params()[:] = params.detach().numpy()
        out = torch.empty((B, H, N, Dv), dtype=torch.float32)
        grads = any(ctx.needs_input_grad[:3]) or (params is not None and params.requires_grad)
        saved = _core._Buffer(plan.saved_bytes) if grads else None
        io = _core._IO(_p(q), _p(k), _p(v), _core._ptr(kvl), _p(out), _core._ptr(ql))
        _core._check(_core.ef_attn_forward(plan._h, ctypes.byref(io),
                                           saved.ptr if saved else None),
                     f"forward of {plan.canonical!r}")
        ctx.plan, ctx.saved_buf, ctx.lens = plan, saved, (kvl, ql)
        ctx.has_params = params is not None
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        plan, kvl, ql = ctx.plan, ctx.lens[0], ctx.lens[1]
        dout = dout.contiguous().float()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ctx.has_params:
            plan.param_grads()[:] = 0
        io = _core._IO(_p(q), _p(k), _p(v), _core._ptr(kvl), _p(out), _core._ptr(ql))
        _core._check(_core.ef_attn_backward(plan._h, ctypes.byref(io), ctx.saved_buf.ptr,
                                            _p(dout), _p(dq), _p(dk), _p(dv)),
                     f"backward of {plan.canonical!r}")
        dparams = torch.from_numpy(plan.param_grads().copy()) if ctx.has_params else None
        return dq, dk, dv, None, None, None, dparams


def _apply(plan, q, k, v, kv_lens, q_lens, params=None):
    B, H, N, M, D, Dv = plan.shape
    want = ((B, H, N, D), (B, H, M, D), (B, H, M, Dv))
    for name, t, w in zip("qkv", (q, k, v), want):
        if tuple(t.shape) != w:
            raise ValueError(f"eformer: {name} has shape {tuple(t.shape)}; the plan "
                             f"{plan.canonical!r} was made for {w}")
    kvl = _lens("kv_lens", kv_lens, B, M)
    ql = _lens("q_lens", q_lens, B, N)
    return _AttnFunction.apply(q, k, v, plan, kvl, ql, params)


def attention(q, k, v, spec="flash", kv_lens=None, q_lens=None):
    """Attention by mechanism `spec` on float32 CPU contiguous tensors q (B, H, N, D),
    k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv), differentiable in q, k and v (backward is
    ef_attn_backward). kv_lens / q_lens: valid keys / queries per sequence. Plans are cached
    per (spec, shape). A mechanism with learned parameters (linformer) uses its plan's own
    initial ones here; eformer.torch.Attention makes them nn.Parameters."""
    for name, t in zip("qkv", (q, k, v)):
        _check(name, t)
    return _apply(_plan(spec, q, k, v), q, k, v, kv_lens, q_lens)


def _with_option(spec, key, value):
    return f"{spec}{',' if ':' in spec else ':'}{key}={value}"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, spec="flash"):
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics (PyTorch
    2.x; 1.13 has none) for what eformer does: (B, H, L, E) or (B, L, E) inputs; is_causal
    (top-left, as PyTorch's); scale (default 1/sqrt(E)); attn_mask None or a boolean
    key-padding mask (True = takes part) broadcastable to (B, H, L, S) that is the same for
    every head and query and, per sequence, True for the first n keys and False after. Other
    masks, float masks and dropout raise NotImplementedError. A query that sees no key outputs
    0 here (PyTorch gives NaN). `spec` picks the mechanism (an approximation where it is one)."""
    if dropout_p:
        raise NotImplementedError("eformer: dropout_p must be 0 (eformer has no attention "
                                  "dropout)")
    if attn_mask is not None and is_causal:
        raise ValueError("eformer: give attn_mask or is_causal, not both (as PyTorch)")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if query.dim() != 4:
        raise ValueError(f"eformer: query has shape {tuple(query.shape)}; expected (B, H, L, E) "
                         "or (B, L, E)")
    B, H, L, E = query.shape
    S = key.shape[-2]
    kv_lens = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise NotImplementedError(f"eformer: attn_mask has dtype {attn_mask.dtype}; only "
                                      "boolean key-padding masks are supported (an additive "
                                      "float mask is not)")
        try:
            m = attn_mask.expand(B, H, L, S) if attn_mask.dim() == 4 else \
                attn_mask.expand(L, S).expand(B, H, L, S) if attn_mask.dim() <= 2 else \
                attn_mask.expand(H, L, S).expand(B, H, L, S)
        except RuntimeError:
            raise ValueError(f"eformer: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to (B, H, L, S) = {(B, H, L, S)}") from None
        row = m[:, :1, :1, :]
        if not bool((m == row).all()):
            raise NotImplementedError("eformer: attn_mask differs between heads or queries; "
                                      "only key-padding masks (one row of keys per sequence) "
                                      "are supported")
        row = row.reshape(B, S)
        n = row.sum(dim=1)
        prefix = torch.arange(S).unsqueeze(0) < n.unsqueeze(1)
        if not bool((row == prefix).all()):
            raise NotImplementedError("eformer: attn_mask is not a key-padding mask: per "
                                      "sequence it must be True for the first n keys and False "
                                      "after")
        kv_lens = n.to(torch.int32)
    if is_causal:
        spec = _with_option(spec, "causal", 1)
    if scale is not None:
        spec = _with_option(spec, "scale", repr(float(scale)))
    q, k, v = (t.contiguous() for t in (query, key, value))
    for name, t in zip(("query", "key", "value"), (q, k, v)):
        _check(name, t)
    out = _apply(_plan(spec, q, k, v), q, k, v, kv_lens, None)
    return out.squeeze(1) if squeeze else out


class Attention(torch.nn.Module):
    """An attention mechanism as a module: forward(q, k, v, kv_lens=None, q_lens=None) on
    (B, H, N, D) float32 CPU contiguous tensors. The module owns its plan and makes a new one
    when the shape changes. A mechanism with learned parameters (linformer) needs its shape
    at construction (heads, head_dim, q_len, kv_len, v_dim: the parameters' sizes depend on
    them) and exposes them as the nn.Parameter `mech`, initialised as the library does; they
    then only fit that shape (any batch)."""

    def __init__(self, spec="flash", heads=None, head_dim=None, q_len=None, kv_len=None,
                 v_dim=None):
        super().__init__()
        self.spec = spec
        self.name = spec.split(":")[0]
        self.caps = capabilities(self.name)
        self._plan = None
        self.mech = None
        self._fixed = None
        if self.caps["params"]:
            if None in (heads, head_dim, q_len):
                raise ValueError(f"eformer: {self.name} has learned parameters whose sizes depend "
                                 "on the shape: give heads=, head_dim= and q_len= (and kv_len=, "
                                 "v_dim= when they differ)")
            self._fixed = (heads, q_len, kv_len or q_len, head_dim, v_dim or head_dim)
            self._plan = Plan(spec, 1, heads, q_len, head_dim, kv_len=kv_len, v_dim=v_dim)
            self.mech = torch.nn.Parameter(torch.from_numpy(self._plan.params().copy()))

    def extra_repr(self):
        return repr(self._plan.canonical if self._plan else self.spec)

    def forward(self, q, k, v, kv_lens=None, q_lens=None):
        for name, t in zip("qkv", (q, k, v)):
            _check(name, t)
        B, H, N, D = q.shape
        M, Dv = k.shape[2], v.shape[3]
        if self._fixed and (H, N, M, D, Dv) != self._fixed:
            raise ValueError(f"eformer: this {self.name} module was made for heads, q_len, kv_len, "
                             f"head_dim, v_dim = {self._fixed}; got {(H, N, M, D, Dv)}")
        shape = (B, H, N, M, D, Dv)
        if self._plan is None or self._plan.shape != shape:
            self._plan = Plan(self.spec, B, H, N, D, kv_len=M, v_dim=Dv)
        return _apply(self._plan, q, k, v, kv_lens, q_lens, self.mech)
