"""eformer.torch: the autograd Function, scaled_dot_product_attention's semantics, the
Attention module (re-planning, learned parameters as nn.Parameters) and a model that learns."""
import math

import pytest
import torch

import eformer
import eformer.torch as et

torch.manual_seed(0)


def ref_attention(q, k, v, mask=None, causal=False, scale=None):
    """plain PyTorch in float64; mask True = takes part; fully masked rows give 0"""
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    N, M = s.shape[-2:]
    m = torch.ones(N, M, dtype=torch.bool)
    if causal:
        m = torch.tril(m)
    m = m.expand_as(s) if mask is None else (m & mask).expand_as(s)
    s = s.masked_fill(~m, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def grads_of(fn, xs, g):
    for x in xs:
        x.grad = None
    out = fn(*xs)
    out.backward(g)
    return out.detach(), [x.grad.clone() for x in xs]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward_backward(causal):
    q, k, v = leaves((2, 3, 29, 12), (2, 3, 29, 12), (2, 3, 29, 10))
    g = torch.randn(2, 3, 29, 10)
    spec = "flash:causal=1" if causal else "flash"
    o1, g1 = grads_of(lambda a, b, c: et.attention(a, b, c, spec=spec), [q, k, v], g)
    o2, g2 = grads_of(lambda a, b, c: ref_attention(a, b, c, causal=causal).float(), [q, k, v], g)
    assert (o1 - o2).abs().max() < 2e-6
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


def test_sdpa_semantics():
    q, k, v = torch.randn(2, 4, 17, 8), torch.randn(2, 4, 23, 8), torch.randn(2, 4, 23, 6)
    out = et.scaled_dot_product_attention(q, k, v)
    assert (out - ref_attention(q, k, v).float()).abs().max() < 2e-6
    out = et.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert (out - ref_attention(q, k, v, scale=0.3).float()).abs().max() < 2e-6
    qq = torch.randn(2, 4, 23, 8)
    out = et.scaled_dot_product_attention(qq, k, v, is_causal=True)
    assert (out - ref_attention(qq, k, v, causal=True).float()).abs().max() < 2e-6
    # key padding: (B, 1, 1, S) boolean, True = takes part; a sequence with no key gives 0
    lens = torch.tensor([23, 0])
    mask = (torch.arange(23)[None, :] < lens[:, None])[:, None, None, :]
    out = et.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = ref_attention(q, k, v, mask=mask).float()
    assert (out - ref).abs().max() < 2e-6 and (out[1] == 0).all()
    # 3-D inputs, non-contiguous views (made contiguous here, as PyTorch accepts them)
    q3, k3 = torch.randn(3, 8, 11).transpose(1, 2), torch.randn(3, 8, 11).transpose(1, 2)
    v3 = torch.randn(3, 11, 5)
    out = et.scaled_dot_product_attention(q3, k3, v3)
    assert out.shape == (3, 11, 5)
    assert (out - ref_attention(q3[:, None], k3[:, None], v3[:, None])[:, 0].float()).abs().max() < 2e-6


def test_sdpa_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError, match="dropout"):
        et.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="float"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8))
    with pytest.raises(NotImplementedError, match="key-padding"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=torch.tril(torch.ones(8, 8, dtype=torch.bool)))
    holes = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    holes[..., 2] = False
    with pytest.raises(NotImplementedError, match="first n keys"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=holes)
    with pytest.raises(ValueError, match="not both"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=holes, is_causal=True)


def test_attention_errors_explain():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match=r"float\(\)"):
        et.attention(q.double(), q, q)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        et.attention(q.transpose(2, 3), q, q)
    with pytest.raises(ValueError, match=r"cpu\(\)"):
        et.attention(torch.empty(1, 2, 8, 4, device="meta"), q, q)
    with pytest.raises(eformer.EformerError, match="nosuch"):
        et.attention(q, q, q, spec="nosuch")
    with pytest.raises(eformer.EformerError, match="EF_ERR_UNSUPPORTED"):
        et.attention(q, q, q, spec="nystrom:causal=1")


def test_module_replans_and_is_deterministic():
    m = et.Attention("local:window=8")
    a = m(*[torch.randn(1, 2, 32, 8) for _ in range(3)])
    assert m._plan.shape == (1, 2, 32, 32, 8, 8)
    x = [torch.randn(3, 2, 48, 8) for _ in range(3)]
    b1, b2 = m(*x), m(*x)
    assert m._plan.shape == (3, 2, 48, 48, 8, 8) and torch.equal(b1, b2) and a.shape == (1, 2, 32, 8)
    assert "local:window=8" in repr(m)


def test_linformer_parameters_are_learned():
    m = et.Attention("linformer:k=8", heads=2, head_dim=8, q_len=24)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["mech"] and m.mech.numel() == m._plan.param_count > 0
    q, k, v = leaves((2, 2, 24, 8), (2, 2, 24, 8), (2, 2, 24, 8))
    out = m(q, k, v)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    g = m.mech.grad.clone()
    assert g.abs().max() > 0
    # central differences of the same loss in a few coordinates of the projections
    idx = torch.randperm(m.mech.numel(), generator=torch.Generator().manual_seed(1))[:6]
    with torch.no_grad():
        for i in idx.tolist():
            h = 1e-2
            base = m.mech[i].item()
            m.mech[i] = base + h
            lp = (m(q, k, v) * w).sum().item()
            m.mech[i] = base - h
            lm = (m(q, k, v) * w).sum().item()
            m.mech[i] = base
            num = (lp - lm) / (2 * h)
            assert abs(num - g[i].item()) < 2e-2 * max(1.0, abs(num)), (i, num, g[i].item())
    # the module's parameters, not the plan's initial ones, are what it computes with
    with torch.no_grad():
        m.mech.mul_(0.5)
    assert not torch.equal(m(q, k, v), out)
    with pytest.raises(ValueError, match="made for"):
        m(*[torch.randn(1, 2, 16, 8) for _ in range(3)])
    with pytest.raises(ValueError, match="q_len="):
        et.Attention("linformer:k=8")


class TinyModel(torch.nn.Module):
    """predict, at every position, the token 3 places back: needs attention"""

    def __init__(self, vocab=8, dim=32, heads=4, spec="flash:causal=1"):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(32, dim) * 0.1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn = et.Attention(spec)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tok):
        B, N = tok.shape
        x = self.emb(tok) + self.pos[:N]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        y = self.attn(q.contiguous(), k.contiguous(), v.contiguous())
        return self.out(y.transpose(1, 2).reshape(B, N, -1) + x)


def test_a_model_with_eformer_attention_learns():
    torch.manual_seed(3)
    model = TinyModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(200):
        tok = torch.randint(0, 8, (16, 32))
        logits = model(tok)
        loss = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 8),
                                                 tok[:, :-3].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # chance is ln 8 = 2.08, and without attention nothing below it is learnable (the target
    # is independent of the token at the position): a loss well below it is attention at work
    assert first > 1.9 and last < 1.2, (first, last)
