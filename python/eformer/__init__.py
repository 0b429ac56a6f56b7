"""eformer: efficient attention on the CPU, from numpy and PyTorch (docs/python.md).

    import eformer
    out = eformer.attention(q, k, v, spec="local:window=128")      # numpy float32 (B, H, N, D)
    import eformer.torch                                             # autograd, nn.Module, SDPA
    m = eformer.Model.load("run.safetensors"); logits, loss = m(tokens, targets=targets)
"""
from ._core import (LIBRARY_PATH, EformerError, Model, Plan, __version__, attention,
                    attention_backward, capabilities, get_num_threads, load_safetensors,
                    mechanisms, set_num_threads)

__all__ = ["attention", "attention_backward", "Plan", "Model", "load_safetensors",
           "EformerError", "capabilities", "mechanisms", "set_num_threads", "get_num_threads",
           "LIBRARY_PATH", "__version__"]
