"""Independent float64 reference of every variant, written head by head from the equations (docs/design.md).

It reads only the weights of a :class:`diffv2.Transformer` (by name) and uses none of the package's code. Given
weights that require grad, it is differentiable, so gradients are checked against it too.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (T, H, d). HF Llama layout: channel c pairs with c + d/2, frequency theta^(-2c/d)."""
    t, _, d = x.shape
    pos = torch.arange(t, dtype=F64)[:, None]
    first, second = [], []
    for c in range(d // 2):
        angle = pos * theta ** (-2 * c / d)
        cos, sin = torch.cos(angle), torch.sin(angle)
        a, b = x[:, :, c], x[:, :, c + d // 2]
        first.append(a * cos - b * sin)
        second.append(b * cos + a * sin)
    return torch.stack(first + second, dim=-1)


def softmax_causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k: (T, d) → causal attention probabilities (T, T) with scale 1/√d."""
    t, d = q.shape
    scores = q @ k.T / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], cfg, layer_idx: int) -> torch.Tensor:
    """One attention layer for one sequence. x: (T, D) already normalised."""
    h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = x.shape[0]
    kind = cfg.attention
    nq = 2 * h if kind == "diff_v2" else h
    q = rope((x @ w["q_proj"].T).view(t, nq, d), cfg.rope_theta)
    k = rope((x @ w["k_proj"].T).view(t, hkv, d), cfg.rope_theta)
    v = (x @ w["v_proj"].T).view(t, hkv, d)
    heads = []
    if kind in ("baseline", "gated"):
        for j in range(h):
            kv = j // (h // hkv)
            head = softmax_causal(q[:, j], k[:, kv]) @ v[:, kv]
            if kind == "gated":  # a per-token sigmoid gate on each head's output
                head = torch.sigmoid(x @ w["gate_proj"][j])[:, None] * head
            heads.append(head)
    elif kind == "diff_v2":
        group = 2 * h // hkv  # query heads per KV head
        if cfg.lambda_mode in ("none", "const"):
            lam = torch.full((t, h), 1.0 if cfg.lambda_mode == "none" else 0.5, dtype=F64)
        else:
            raw = x @ w["lambda_proj"].T  # (T, h)
            lam = torch.sigmoid(raw) if cfg.lambda_mode == "sigmoid" else raw
        for i in range(h):
            j1, j2 = (2 * i, 2 * i + 1) if cfg.pairing == "interleaved" else (i, i + h)
            o1 = softmax_causal(q[:, j1], k[:, j1 // group]) @ v[:, j1 // group]
            o2 = softmax_causal(q[:, j2], k[:, j2 // group]) @ v[:, j2 // group]
            heads.append(o1 - lam[:, i : i + 1] * o2)
    else:  # diff_v1, flash semantics: head i, group g = i // (h/hkv); k1, k2 = K heads 2g, 2g+1
        lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        lam = (
            torch.exp((w["lambda_q1"] * w["lambda_k1"]).sum())
            - torch.exp((w["lambda_q2"] * w["lambda_k2"]).sum())
            + lam_init
        )
        for i in range(h // 2):
            g = i // (h // hkv)
            value = torch.cat((v[:, 2 * g], v[:, 2 * g + 1]), dim=-1)  # (T, 2d)
            a1 = softmax_causal(q[:, 2 * i], k[:, 2 * g])
            a2 = softmax_causal(q[:, 2 * i + 1], k[:, 2 * g + 1])
            head = (a1 - lam * a2) @ value
            heads.append(rms_norm(head, w["subln"], 1e-5) * (1 - lam_init))
    return torch.cat(heads, dim=-1) @ w["o_proj"].T


def weights(model) -> dict[str, torch.Tensor]:
    """The model's weights as float64 leaves that require grad, by state-dict name."""
    return {k: v.detach().to("cpu", F64).requires_grad_() for k, v in model.state_dict().items()}


def forward(model, tokens: torch.Tensor, sd: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (B, T, V) in float64 from the model's weights (or ``sd``, e.g. from :func:`weights`)."""
    cfg = model.cfg
    if sd is None:
        sd = {k: v.detach().to("cpu", F64) for k, v in model.state_dict().items()}
    out = []
    for seq in tokens:
        hid = sd["tok_embeddings.weight"][seq]
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            w = {
                name.removeprefix(p + "attn.").removesuffix(".weight"): val
                for name, val in sd.items()
                if name.startswith(p + "attn.")
            }
            hid = hid + attention(rms_norm(hid, sd[p + "attn_norm.weight"], cfg.norm_eps), w, cfg, i)
            x = rms_norm(hid, sd[p + "mlp_norm.weight"], cfg.norm_eps)
            gate = x @ sd[p + "mlp.gate_proj.weight"].T
            hid = (
                hid
                + (gate * torch.sigmoid(gate) * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
            )
        hid = rms_norm(hid, sd["norm.weight"], cfg.norm_eps)
        out.append(hid @ sd["lm_head.weight"].T)
    return torch.stack(out)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention in float64, head by head: q (B, Hq, T, d), k/v (B, Hkv, S, d); query head j reads K/V head
    j // (Hq/Hkv). ``mask`` (B, 1, T, S), True = may attend (default: causal, queries aligned to the last T keys);
    a query with no key gets zeros."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    if mask is None:
        mask = (torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None])[None, None].expand(b, 1, t, s)
    out = torch.zeros(b, hq, t, v.shape[-1], dtype=F64)
    for row in range(b):
        for j in range(hq):
            kv = j // (hq // hkv)
            scores = (q[row, j].to("cpu", F64) @ k[row, kv].to("cpu", F64).T) * scale
            scores = scores.masked_fill(~mask[row, 0].cpu(), float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[row, j] = probs @ v[row, kv].to("cpu", F64)
    return out


def subtract_pairs(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DIFF V2's output heads from the 2h query heads' outputs (B, 2h, T, d): head i = out[2i] − weight[i]·out[2i+1],
    weight (B, h, T)."""
    weight = weight.to("cpu", F64)
    heads = [out[:, 2 * i] - weight[:, i, :, None] * out[:, 2 * i + 1] for i in range(out.shape[1] // 2)]
    return torch.stack(heads, dim=1)
