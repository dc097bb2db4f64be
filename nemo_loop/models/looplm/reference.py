"""A plain-PyTorch Ouro forward, independent of megatron-core, for conversion parity.

It reads HF-named tensors and an HF ``config.json`` dict and follows OuroForCausalLM: per layer
x ← x + N₂(Attn(N₁(x))); x ← x + N₄(MLP(N₃(x))) with four RMSNorms; after each of the R loops
the final norm is applied, and that normalized state feeds the next loop, the LM head (per-loop
logits) and the early-exit gate. RoPE uses the rotate-half convention of HF Llama/Qwen2.
Nothing here is optimised: it exists to be obviously correct.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype=torch.float32):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [s, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x: [b, heads, s, head_dim]


def attention(x, weights: Mapping[str, torch.Tensor], prefix: str, config: dict, cos, sin):
    batch, seq, hidden = x.shape
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = hidden // heads

    def project(name, count):
        out = x @ weights[f"{prefix}self_attn.{name}_proj.weight"].T
        return out.view(batch, seq, count, head_dim).transpose(1, 2)

    q = apply_rope(project("q", heads), cos, sin)
    k = apply_rope(project("k", kv_heads), cos, sin)
    v = project("v", kv_heads)
    # GQA: query head h attends with KV head h // (heads / kv_heads).
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / head_dim ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(batch, seq, heads * head_dim)
    return context @ weights[f"{prefix}self_attn.o_proj.weight"].T


def mlp(x, weights: Mapping[str, torch.Tensor], prefix: str):
    gate = x @ weights[f"{prefix}mlp.gate_proj.weight"].T
    up = x @ weights[f"{prefix}mlp.up_proj.weight"].T
    return (F.silu(gate) * up) @ weights[f"{prefix}mlp.down_proj.weight"].T


def decoder_layer(x, weights, index: int, config: dict, cos, sin):
    prefix = f"model.layers.{index}."
    eps = config.get("rms_norm_eps", 1e-6)

    def norm(name, h):
        return rms_norm(h, weights[f"{prefix}{name}.weight"], eps)

    x = x + norm("input_layernorm_2",
                 attention(norm("input_layernorm", x), weights, prefix, config, cos, sin))
    return x + norm("post_attention_layernorm_2", mlp(norm("post_attention_layernorm", x),
                                                      weights, prefix))


def exit_probabilities(gate_logits: torch.Tensor) -> torch.Tensor:
    """p_r = σ(g_r)·∏_{j<r}(1−σ(g_j)); the last loop takes what is left. [R, ...] → [R, ...]."""
    remaining = torch.ones_like(gate_logits[0])
    probs = []
    for r, logit in enumerate(gate_logits):
        if r == len(gate_logits) - 1:
            probs.append(remaining)
        else:
            exit_now = torch.sigmoid(logit)
            probs.append(exit_now * remaining)
            remaining = remaining * (1 - exit_now)
    return torch.stack(probs)


@torch.no_grad()
def ouro_reference_forward(weights: Mapping[str, torch.Tensor], config: dict,
                           input_ids: torch.Tensor, num_loops: int | None = None):
    """Per-loop logits [R̃, b, s, V] and exit probabilities [R̃, b, s] of an Ouro model."""
    num_loops = num_loops or config.get("total_ut_steps", 4)
    eps = config.get("rms_norm_eps", 1e-6)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    embed = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight", embed) if config.get("tie_word_embeddings") \
        else weights["lm_head.weight"]
    cos, sin = rope_cos_sin(input_ids.shape[1], head_dim, config.get("rope_theta", 10000.0),
                            embed.dtype)
    hidden = embed[input_ids]
    logits, gates = [], []
    for _ in range(num_loops):
        for index in range(config["num_hidden_layers"]):
            hidden = decoder_layer(hidden, weights, index, config, cos, sin)
        hidden = rms_norm(hidden, weights["model.norm.weight"], eps)
        logits.append(hidden @ head.T)
        gates.append((hidden @ weights["model.early_exit_gate.weight"].T
                      + weights["model.early_exit_gate.bias"]).squeeze(-1))
    return torch.stack(logits), exit_probabilities(torch.stack(gates))
