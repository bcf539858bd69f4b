"""A Llama-style decoder, nanoGPT-compact.

Pre-norm RMSNorm, rotary position embeddings (Hugging Face Llama "rotate_half" convention), SwiGLU MLP,
causal scaled-dot-product attention, no biases, LM head tied to the token embedding. Submodule names match
`transformers.LlamaForCausalLM` (minus its `model.` prefix), so exporting is a key rename.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


def swiglu_width(d_model: int, multiple: int = 256) -> int:
    """8/3 d_model (SwiGLU's three matrices cost as much as a 4x GELU MLP), rounded up to `multiple`."""
    return multiple * math.ceil(8 * d_model / 3 / multiple)


GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64 for fast matmuls

# Parameter counts (tied embedding counted once): nano 0.63M, tiny 1.01M, mini 2.58M, small 10.2M,
# 125m 123.6M, 350m 359.8M, 720m 719.6M. tiny is 78% embedding; "blocks" (1.12M with a 2048 vocabulary) puts 76%
# of its parameters in the block matrices that the low-rank methods compress, like 125m (69%), at tiny's cost
# per token.
PRESETS: dict[str, dict] = {
    "nano": dict(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=256),
    "tiny": dict(vocab_size=8192, d_model=96, n_layers=2, n_heads=3, d_ff=256, max_seq_len=256),
    "blocks": dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256),
    "mini": dict(vocab_size=8192, d_model=160, n_layers=4, n_heads=4, d_ff=448, max_seq_len=256),
    "small": dict(vocab_size=8192, d_model=384, n_layers=4, n_heads=6, d_ff=1024, max_seq_len=512),
    "125m": dict(vocab_size=GPT2_VOCAB, d_model=768, n_layers=12, n_heads=12, d_ff=swiglu_width(768),
                 max_seq_len=2048),
    "350m": dict(vocab_size=GPT2_VOCAB, d_model=1024, n_layers=24, n_heads=16, d_ff=swiglu_width(1024),
                 max_seq_len=2048),
    "720m": dict(vocab_size=GPT2_VOCAB, d_model=2048, n_layers=12, n_heads=16, d_ff=swiglu_width(2048),
                 max_seq_len=2048),
}


def model_config(preset: str, vocab_size: int | None = None, max_seq_len: int | None = None) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    cfg = ModelConfig(**PRESETS[preset])
    cfg.vocab_size = vocab_size or cfg.vocab_size
    cfg.max_seq_len = max_seq_len or cfg.max_seq_len
    return cfg


def preset_params(preset: str, vocab_size: int | None = None) -> int:
    """The preset's parameter count (with `vocab_size` in place of its own), from a model on the meta device."""
    with torch.device("meta"):
        return GPT(model_config(preset, vocab_size)).num_params()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 even under autocast, as Hugging Face Llama does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim); recomputed per call (cheap) so no buffer lives on meta."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        device = torch.device(device) if device is not None else torch.get_default_device()
        # Build on meta (no global-RNG draws, no wasted default init), then materialize and initialize
        # from a private generator: worker threads build bit-identical replicas concurrently.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.d_model, config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.lm_head.weight = self.embed_tokens.weight  # tie after to_empty, which makes new tensors
        if device.type != "meta":
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int):
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers), norms at 1.

        Values are drawn on the CPU so a seed gives the same weights on every device."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std, residual_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls (the tied LM head included), plus attention scores
        and values (PaLM appendix B / nanoGPT), for computing MFU."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layers * c.d_model * seq_len

    def forward(self, idx, targets=None):
        T = idx.size(1)
        assert T <= self.config.max_seq_len, f"sequence length {T} > max_seq_len {self.config.max_seq_len}"
        cos, sin = rotary_cos_sin(T, self.config.d_model // self.config.n_heads, self.config.rope_theta,
                                  idx.device)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            # fp32 loss even when the logits come out of bf16 autocast
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss
