"""eformer.Model and load_safetensors on a checkpoint `eformer train` wrote: the logits give
the loss, accuracy and bits per byte that `eformer eval` reports for the same held-out windows
(rebuilt here from docs/tasks.md), and the tensors are the model's."""
import json
import math
import subprocess

import numpy as np
import pytest

import eformer

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog.\n" % (i % 17)
                for i in range(300))
LEN = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory, eformer_bin):
    d = tmp_path_factory.mktemp("model")
    (d / "t.txt").write_bytes(TEXT)
    task = f"text:{d / 't.txt'},len={LEN}"
    ckpt = d / "m.safetensors"
    subprocess.run([eformer_bin, "train", "--task", task, "--model",
                    "layers=2,dim=32,heads=2,ff=64,attn=local:window=8,causal=1", "--steps", "60",
                    "--batch", "8", "--lr", "3e-3", "--warmup", "10", "--save", str(ckpt),
                    "--threads", "1"], check=True, capture_output=True)
    ev = subprocess.run([eformer_bin, "eval", "--load", str(ckpt), "--json", "--threads", "1"],
                        check=True, capture_output=True, text=True).stdout
    rec = [json.loads(x) for x in ev.splitlines() if '"split":"eval"' in x][-1]
    return ckpt, rec


def eval_windows():
    """the eval split of text:FILE,len=LEN,heldout=0.05 (docs/tasks.md)"""
    size = len(TEXT)
    held = int(math.floor(size * 0.05))
    T = size - held
    n = math.ceil((held - 1) / LEN)
    tok = np.zeros((n, LEN), np.int32)
    tgt = np.full((n, LEN), -1, np.int32)
    lens = np.zeros(n, np.int32)
    for i in range(n):
        s = T + i * LEN
        m = min(LEN, size - 1 - s)
        tok[i, :m] = np.frombuffer(TEXT[s:s + m], np.uint8)
        tgt[i, :m] = np.frombuffer(TEXT[s + 1:s + 1 + m], np.uint8)
        lens[i] = m
    return tok, tgt, lens


def test_model_logits_reproduce_eformer_eval(trained):
    ckpt, rec = trained
    tok, tgt, lens = eval_windows()
    assert len(tok) == rec["samples"]
    m = eformer.Model.load(str(ckpt), batch=len(tok))
    assert m.info["causal"] == 1 and m.info["vocab"] == 256 and "local:window=8" in m.spec
    logits, loss = m(tok, lens=lens, targets=tgt)
    assert logits.shape == (len(tok), LEN, 256) and logits.dtype == np.float32
    # padded rows are 0; the cross-entropy and argmax of the logits are eformer eval's figures
    for i, n in enumerate(lens):
        assert (logits[i, n:] == 0).all()
    valid = tgt >= 0
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse - np.take_along_axis(lg, np.maximum(tgt, 0)[..., None], -1)[..., 0]
    ce = nll[valid].mean()
    acc = (lg.argmax(-1) == tgt)[valid].mean()
    assert valid.sum() == rec["count"]
    assert abs(ce - rec["loss"]) < 1e-5 * rec["loss"]
    assert abs(loss - rec["loss"]) < 1e-5 * rec["loss"]
    assert abs(acc - rec["acc"]) < 1e-9
    assert abs(ce / math.log(2) - rec["bpb"]) < 1e-5 * rec["bpb"]


def test_load_safetensors_matches_the_model(trained):
    ckpt, _ = trained
    tensors, meta = eformer.load_safetensors(str(ckpt), with_metadata=True)
    assert meta["eformer.spec"].startswith("layers=2,dim=32")
    assert tensors["embed.weight"].shape == (256, 32)
    assert tensors["layers.1.attn.q.weight"].dtype == np.float32
    m = eformer.Model.load(str(ckpt))
    lg, _ = m(np.zeros((1, 8), np.int32))
    assert np.abs(lg).max() > 0 and not np.isnan(lg).any()


def test_model_errors(trained, tmp_path):
    ckpt, _ = trained
    m = eformer.Model.load(str(ckpt), batch=2)
    with pytest.raises(ValueError, match="batch"):
        m(np.zeros((3, 8), np.int32))
    with pytest.raises(ValueError, match="targets"):
        m(np.zeros((1, 8), np.int32), targets=np.zeros((1, 7), np.int32))
    with pytest.raises(eformer.EformerError, match="token"):
        m(np.full((1, 8), 300, np.int32))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(eformer.EformerError) as e:
        eformer.Model.load(str(bad))
    assert e.value.status == "EF_ERR_FORMAT"
    with pytest.raises(eformer.EformerError) as e:
        eformer.Model.load(str(tmp_path / "missing.safetensors"))
    assert e.value.status == "EF_ERR_IO"
