"""The numpy API: results against numpy arithmetic, padding, backward, and every error a
caller can make, with the message that explains it."""
import numpy as np
import pytest

import eformer


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def softmax_attention(q, k, v, causal=False, kv_lens=None):
    """double-precision reference, no eformer code"""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    N, M = s.shape[-2:]
    mask = np.ones((q.shape[0], 1, N, M), bool)
    if causal:
        mask &= np.tril(np.ones((N, M), bool))
    if kv_lens is not None:
        for b, n in enumerate(kv_lens):
            mask[b, :, :, n:] = False
    s = np.where(mask, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(s - mx)
    den = p.sum(-1, keepdims=True)
    p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
    return p @ v


def test_version_and_registry():
    assert eformer.__version__.count(".") == 2
    names = eformer.mechanisms()
    assert "flash" in names and "lsh" in names and len(names) >= 16
    caps = eformer.capabilities("linformer")
    assert caps["params"] and not caps["causal"]
    assert eformer.capabilities("lsh")["shared_qk"]


@pytest.mark.parametrize("causal", [0, 1])
def test_flash_matches_numpy(causal):
    q, k, v = rand(2, 3, 37, 12, seed=1), rand(2, 3, 37, 12, seed=2), rand(2, 3, 37, 10, seed=3)
    out = eformer.attention(q, k, v, spec=f"flash:causal={causal}")
    ref = softmax_attention(q, k, v, causal=bool(causal))
    assert out.dtype == np.float32 and out.shape == (2, 3, 37, 10)
    assert np.abs(out - ref).max() < 2e-6


def test_cross_attention_and_key_padding():
    q, k, v = rand(2, 2, 19, 8, seed=4), rand(2, 2, 41, 8, seed=5), rand(2, 2, 41, 8, seed=6)
    lens = [41, 7]
    k[1, :, 7:] = np.nan  # padded keys are never read
    v[1, :, 7:] = np.nan
    out = eformer.attention(q, k, v, spec="flash", kv_lens=lens)
    kk, vv = np.nan_to_num(k), np.nan_to_num(v)
    ref = softmax_attention(q, kk, vv, kv_lens=lens)
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 2e-6


def test_query_padding_zero_rows():
    q, k, v = rand(2, 2, 16, 8, seed=7), rand(2, 2, 16, 8, seed=8), rand(2, 2, 16, 8, seed=9)
    out = eformer.attention(q, k, v, spec="local:window=4", q_lens=[16, 5])
    assert (out[1, :, 5:] == 0).all() and (out[0] != 0).any()


def test_backward_matches_finite_differences():
    q, k, v = rand(1, 2, 9, 4, seed=10), rand(1, 2, 9, 4, seed=11), rand(1, 2, 9, 4, seed=12)
    g = rand(1, 2, 9, 4, seed=13)
    out, dq, dk, dv = eformer.attention_backward(q, k, v, g, spec="flash:causal=1")

    def loss(q_, k_, v_):
        return (softmax_attention(q_, k_, v_, causal=True) * g).sum()

    h = 1e-3
    for x, dx in ((q, dq), (k, dk), (v, dv)):
        num = np.zeros_like(dx, dtype=np.float64)
        for idx in np.ndindex(x.shape):
            x0 = x[idx]
            x[idx] = x0 + h
            lp = loss(q, k, v)
            x[idx] = x0 - h
            lm = loss(q, k, v)
            x[idx] = x0
            num[idx] = (lp - lm) / (2 * h)
        # float32 inputs perturbed by 1e-3: central differences good to ~1e-5 here
        assert np.abs(dx - num).max() < 1e-3 * max(1, np.abs(num).max())


def test_plan_reuse_and_describe():
    p = eformer.Plan("local:window=8", batch=1, heads=2, q_len=32, head_dim=8)
    assert p.canonical.startswith("local:window=8") and p.shape == (1, 2, 32, 32, 8, 8)
    q = rand(1, 2, 32, 8, seed=14)
    a = p.forward(q, q, q)
    b = p.forward(q, q, q)
    assert np.array_equal(a, b)  # deterministic
    m = p.visible(0)
    assert m[10, 14] and not m[10, 15] and m.sum() == sum(
        1 for i in range(32) for j in range(32) if abs(i - j) <= 4)
    assert p.flops(backward=True) > p.flops() > 0


# ----------------------------------------------------------------------------------------
# errors: the library's (EformerError with its message) and the binding's (TypeError /
# ValueError saying what to do)
# ----------------------------------------------------------------------------------------
def test_library_errors_carry_the_message():
    q = rand(1, 1, 8, 4)
    with pytest.raises(eformer.EformerError) as e:
        eformer.attention(q, q, q, spec="nosuch")
    assert e.value.status == "EF_ERR_ARG" and "nosuch" in str(e.value)
    with pytest.raises(eformer.EformerError) as e:
        eformer.attention(q, q, q, spec="flash:window=3")
    assert "window" in str(e.value)
    with pytest.raises(eformer.EformerError) as e:
        eformer.attention(q, q, q, spec="linformer:causal=1")
    assert e.value.status == "EF_ERR_UNSUPPORTED" and "causal" in str(e.value)


def test_dtype_contiguity_shape_errors():
    q = rand(1, 2, 8, 4)
    with pytest.raises(TypeError, match="float32"):
        eformer.attention(q.astype(np.float64), q, q)
    with pytest.raises(ValueError, match="contiguous"):
        eformer.attention(np.swapaxes(q, 2, 3), q, q)
    with pytest.raises(ValueError, match="dimensions"):
        eformer.attention(q[0], q, q)
    with pytest.raises(ValueError, match="fit together"):
        eformer.attention(q, rand(1, 3, 8, 4), q)
    with pytest.raises(TypeError, match="numpy"):
        eformer.attention(q.tolist(), q, q)
    with pytest.raises(ValueError, match="kv_lens"):
        eformer.attention(q, q, q, kv_lens=[9])
    with pytest.raises(ValueError, match=r"within \[0, 8\]"):
        eformer.attention(q, q, q, kv_lens=[9] * 1)
    p = eformer.Plan("flash", 1, 2, 8, 4)
    with pytest.raises(ValueError, match="was made for"):
        p.forward(rand(1, 2, 9, 4), rand(1, 2, 9, 4), rand(1, 2, 9, 4))
    with pytest.raises(TypeError, match="keep=True"):
        p.backward(None, q)


def test_safetensors_reader(tmp_path):
    import json
    import struct

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    hdr = {"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2, 3],
                                             "data_offsets": [0, 24]}}
    raw = json.dumps(hdr).encode()
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes())
    d, meta = eformer.load_safetensors(str(f), with_metadata=True)
    assert np.array_equal(d["a"], a) and meta == {"k": "v"}
    f.write_bytes(struct.pack("<Q", 10_000) + raw)
    with pytest.raises(ValueError, match="claims more"):
        eformer.load_safetensors(str(f))
    hdr["a"]["data_offsets"] = [0, 20]
    raw = json.dumps(hdr).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes())
    with pytest.raises(ValueError, match="do not fit"):
        eformer.load_safetensors(str(f))
