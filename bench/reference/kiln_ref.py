"""PyTorch reference implementation of the kiln LLaMA model.

Module attribute names mirror kiln's tensor names, so ``model.state_dict()``
keys are exactly the kiln names (``tok_embeddings.weight``,
``layers.0.attention.wq.weight``, ..., ``norm.weight``, ``output.weight``).
Linear weights are stored (out, in), as in PyTorch. No biases, no dropout.
``Llama(cfg, causal=False)`` is the bidirectional encoder of kiln's
``model.attention = "bidirectional"`` (masked language modelling): the same
blocks without the causal mask. The default is the causal decoder.

Shapes: b = batch, t = sequence length, d = dim, h = n_heads,
kv = n_kv_heads, hd = head_dim = d / h, f = ffn_dim, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        assert self.dim % self.n_heads == 0
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Build from a dict, ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (..., d)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(t: int, hd: int, theta: float, dtype=torch.float32, device=None):
    """cos/sin of shape (t, hd): angles (t, hd/2) duplicated along the last dim.

    Computed in float64 then cast: inv_freq[i] = theta^(-2i/hd), angle = pos * inv_freq.
    """
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (t, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (t, hd)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


def rotate_half(x):  # x: (..., hd) -> cat(-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x: (b, heads, t, hd); cos/sin: (t, hd)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep: int):  # (b, kv, t, hd) -> (b, kv*n_rep, t, hd); head j uses kv j // n_rep
    if n_rep == 1:
        return x
    b, kv, t, hd = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, hd).reshape(b, kv * n_rep, t, hd)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, attn_impl: str = "math", causal: bool = True):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        assert cfg.n_heads % cfg.n_kv_heads == 0
        self.attn_impl = attn_impl
        self.causal = causal
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin):  # x: (b, t, d)
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)  # (b, h, t, hd)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.hd).transpose(1, 2)  # (b, kv, t, hd)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.hd).transpose(1, 2)  # (b, kv, t, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (b, h, t, hd)
        if self.attn_impl == "sdpa":  # same math, fused kernel (used for benchmarking)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)  # (b, h, t, t)
            if self.causal:  # position i sees positions <= i
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            o = p @ v  # (b, h, t, hd)
        o = o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd)  # (b, t, h*hd)
        return self.wo(o)  # (b, t, d)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):  # (b, t, d) -> (b, t, d)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, attn_impl: str = "math", causal: bool = True):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attn_impl, causal)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):  # (b, t, d)
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, attn_impl: str = "math", causal: bool = True):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attn_impl, causal) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, input_ids):  # (b, t) int64 -> logits (b, t, V)
        t = input_ids.shape[1]
        assert t <= self.cfg.max_seq_len, f"seq len {t} > max_seq_len {self.cfg.max_seq_len}"
        x = self.tok_embeddings(input_ids)  # (b, t, d)
        cos, sin = rope_cos_sin(t, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if self.output is None:
            return x @ self.tok_embeddings.weight.T  # tied head
        return self.output(x)

    def loss(self, input_ids, targets, reduction: str = "mean"):
        """Cross-entropy over targets != -100 (mean, or 'sum' for grad accumulation)."""
        logits = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=-100, reduction=reduction)


def init_weights(model: Llama, std: float = 0.02, scaled_residual: bool = True):
    """kiln init: N(0, std) for embeddings and linears; wo and w2 use
    std / sqrt(2 * n_layers) when scaled_residual; norms are ones."""
    resid_std = std / math.sqrt(2 * model.cfg.n_layers) if scaled_residual else std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(p, 0.0, resid_std)
        else:
            nn.init.normal_(p, 0.0, std)


def param_groups(model: Llama, weight_decay: float):
    """AdamW groups: decay only 2-D weights other than tok_embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith("tok_embeddings") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def save_weights(model: Llama, path: str, extra: dict | None = None):
    """Save weights under kiln names (plus optional extra tensors) as safetensors."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    save_file(tensors, path)


def load_safetensors_weights(model: Llama, path: str, strict: bool = True):
    """Load kiln-named weights from a safetensors file (extra tensors such as
    ``fixture.*`` / ``grad.*`` are ignored). Returns the list of loaded names."""
    from safetensors.torch import load_file
    tensors = load_file(path)
    sd = model.state_dict()
    missing = [k for k in sd if k not in tensors]
    if strict and missing:
        raise KeyError(f"{path}: missing tensors {missing}")
    with torch.no_grad():
        for k in sd:
            if k in tensors:
                src = tensors[k]
                if src.shape != sd[k].shape:
                    raise ValueError(f"{k}: shape {tuple(src.shape)} != {tuple(sd[k].shape)}")
                sd[k].copy_(src.to(sd[k].dtype))
    return [k for k in sd if k in tensors]
