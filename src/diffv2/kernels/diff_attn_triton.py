"""Fused DIFF V2 attention for training and prefill (causal, T == S), forward and backward, in Triton.

Output head i = softmax(q_2i kᵀ·s) v − w_i·softmax(q_2i+1 kᵀ·s) v, with the 2h query heads over h_kv KV heads
(query head j reads KV head j // (2h/h_kv); both members of a pair sit in one group because the group size is
even) and w (B, h, T) the per-token weight σ(λ), computed outside. FlashAttention-2 style:
- forward: grid (query blocks, B·h pairs); one program runs both heads of its pair over the same K/V tiles
  (read once), two online softmaxes in fp32 (exp2, log2 units); the epilogue writes out = o1 − w·o2 in fp32
  before the cast, plus o2 and both log-sum-exps for the backward;
- backward: with dO1 = dout and dO2 = −w·dout, delta1 = Σ dout·o1 = Σ dout·out + w·Σ dout·o2, delta2 =
  −w·Σ dout·o2 and dw = −Σ dout·o2 (one small kernel). dK/dV: grid (key blocks, B·h_kv), each program loops
  over every pair of its group; a pair shares its dout tile, so dV takes one product (p1 − w·p2)ᵀ·dout and
  dP one v·doutᵀ. dQ: a separate kernel over (query blocks, pairs), no atomics, so results are deterministic.
All accumulation is fp32; probabilities and dS enter the tensor-core products in the input dtype, as in
flash attention. The launches are ``torch.library`` custom ops (``diffv2::diff_attn_fwd``/``_bwd``) with fake
impls and a registered autograd formula, so ``torch.compile(fullgraph=True)`` keeps them in the graph.
:mod:`diffv2.attention.dispatch` picks them where :func:`diff_attention_supported` holds.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatcher never picks these kernels there
    triton = None

HAS_TRITON = triton is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at import, so read once here too

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel and head_dim (fwd/dq: a program owns BLOCK_M
# queries; dkdv: BLOCK_N keys). Not yet timed: chosen offline as the largest tiles that compile for sm_90 with Triton
# 3.6 without register spills, 8 warps splitting the 128-row dimension; tune with bench/diff_attn_kernel.py --sweep
CONFIGS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    64: {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 64, 8, 2)},
    128: {"fwd": (128, 32, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (128, 32, 8, 2)},
}
# the CPU interpreter: small tiles, so that short test sequences still span several blocks
INTERPRET_BLOCKS: dict[str, tuple[int, int]] = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> None:
    """ValueError naming the argument whose shape does not fit q (B, 2h, T, d), k/v (B, h_kv, T, d), w (B, h, T)."""
    if q.dim() != 4 or q.shape[1] % 2:
        raise ValueError(f"diff_attention: q must be (B, 2h, T, d) with an even head count, got {tuple(q.shape)}")
    b, hq, t, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2:] != (t, d) or hq % k.shape[1] or (hq // k.shape[1]) % 2:
        raise ValueError(
            f"diff_attention: k must be (B, h_kv, T, d) = ({b}, h_kv, {t}, {d}) with 2h = {hq} an even multiple of "
            f"h_kv (causal, T == S), got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"diff_attention: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if w.shape != (b, hq // 2, t):
        raise ValueError(f"diff_attention: w must be (B, h, T) = {(b, hq // 2, t)}, got {tuple(w.shape)}")
    if not (q.device == k.device == v.device == w.device):
        raise ValueError(f"diff_attention: q, k, v, w on different devices: {[x.device for x in (q, k, v, w)]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"diff_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def diff_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs: a device Triton runs on (CUDA, or the CPU interpreter under
    ``TRITON_INTERPRET=1``), and shapes and dtypes they handle."""
    if not HAS_TRITON or q.dim() != 4 or k.dim() != 4 or q.numel() == 0:
        return False
    d = q.shape[-1]
    return (
        (q.is_cuda or (_INTERPRET and q.device.type == "cpu"))
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype == v.dtype
        and 16 <= d <= 128
        and d & (d - 1) == 0  # tl.arange needs a power of two
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
        and (q.shape[1] // k.shape[1]) % 2 == 0
    )


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def diff_attention(q, k, v, w, *, scale: float | None = None) -> torch.Tensor:
    """DIFF V2 causal attention. q: (B, 2h, T, d); k, v: (B, h_kv, T, d) (strided views are fine); w: (B, h, T)
    (fp32). Returns (B, h, T, d) in q's dtype (laid out as a transposed (B, T, h, d) buffer), differentiable
    w.r.t. q, k, v and w."""
    _check(q, k, v, w)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not diff_attention_supported(q, k, v):
        raise ValueError(
            f"diff_attention: Triton cannot run q{tuple(q.shape)} {q.dtype} on {q.device} "
            "(see diff_attention_supported)"
        )
    w = w.to(torch.float32)  # differentiable: a bf16 w gets its gradient cast back
    return torch.ops.diffv2.diff_attn_fwd(_unit_last(q), _unit_last(k), _unit_last(v), w, scale)[0]


def _config(kind: str, q: torch.Tensor) -> dict:
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, not TF32
    if _INTERPRET:
        bm, bn = INTERPRET_BLOCKS[kind]
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 1, "num_stages": 1, "PRECISION": precision}
    bm, bn, warps, stages = CONFIGS[max(64, q.shape[-1])][kind]
    if q.dtype == torch.float32:  # tests only: twice the bytes per tile, so smaller tiles and fewer stages
        bm, bn, stages = min(bm, 32), min(bn, 32), 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "PRECISION": precision}


if HAS_TRITON:

    @triton.jit
    def _fwd_step(q, kt, vt, m_i, l_i, acc, allowed, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """One online-softmax update of a (BLOCK_M, D) accumulator with a (BLOCK_N, D) K/V tile."""
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _query_pair_block(Q, sqb, sqh, sqt, n_pairs, T, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """This program's batch b, pair i and BLOCK_M query rows (the last blocks, with the most keys, first:
        the short ones fill the tail of the launch), and both queries of the pair for those rows."""
        pid_m, pid_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
        b, i = (pid_bh // n_pairs).to(tl.int64), pid_bh % n_pairs
        start_m = pid_m * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        dd = tl.arange(0, D)
        q_ptrs = Q + b * sqb + (2 * i).to(tl.int64) * sqh + rows[:, None] * sqt + dd[None, :]
        q1 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_ptrs + sqh, mask=row_ok[:, None], other=0.0)
        return b, i, start_m, rows, row_ok, dd, q1, q2

    # A kernel's signature keeps its layout (fmt: skip), one line per role: the tensors, each tensor's strides,
    # the sizes, the compile-time constants; the launches pass them in the same order.
    @triton.jit
    def _diff_attn_fwd_kernel(
        Q, K, V, W, OUT, O2, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, swb, swh, swt, sob, soh, sot, s2b, s2h, s2t,
        n_pairs, T, qk_scale,
        GROUP_PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        b, i, start_m, rows, row_ok, dd, q1, q2 = _query_pair_block(Q, sqb, sqh, sqt, n_pairs, T, D, BLOCK_M)
        hk = (i // GROUP_PAIRS).to(tl.int64)
        k_base, v_base = K + b * skb + hk * skh, V + b * svb + hk * svh
        # a finite start keeps exp2(m_old − m_new) free of (−inf) − (−inf); every row sees key 0 first
        m1 = tl.full([BLOCK_M], -1.0e30, tl.float32)
        m2 = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        l2 = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        mid = (start_m // BLOCK_N) * BLOCK_N  # keys below it precede every query of the block: no mask
        for n0 in range(0, mid, BLOCK_N):
            keys = n0 + cols
            kt = tl.load(k_base + keys[:, None] * skt + dd[None, :])
            vt = tl.load(v_base + keys[:, None] * svt + dd[None, :])
            m1, l1, acc1 = _fwd_step(q1, kt, vt, m1, l1, acc1, None, qk_scale, False, PRECISION)
            m2, l2, acc2 = _fwd_step(q2, kt, vt, m2, l2, acc2, None, qk_scale, False, PRECISION)
        for n0 in range(mid, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):  # the diagonal: causal mask
            keys = n0 + cols
            kt = tl.load(k_base + keys[:, None] * skt + dd[None, :], mask=(keys < T)[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * svt + dd[None, :], mask=(keys < T)[:, None], other=0.0)
            allowed = keys[None, :] <= rows[:, None]  # a valid row's keys are < T through this
            m1, l1, acc1 = _fwd_step(q1, kt, vt, m1, l1, acc1, allowed, qk_scale, True, PRECISION)
            m2, l2, acc2 = _fwd_step(q2, kt, vt, m2, l2, acc2, allowed, qk_scale, True, PRECISION)

        o2 = acc2 / l2[:, None]
        w = tl.load(W + b * swb + i * swh + rows * swt, mask=row_ok, other=0.0)
        out = acc1 / l1[:, None] - w[:, None] * o2  # fp32: the difference can cancel
        o_off = b * sob + i.to(tl.int64) * soh + rows[:, None] * sot + dd[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        o2_off = b * s2b + i.to(tl.int64) * s2h + rows[:, None] * s2t + dd[None, :]
        tl.store(O2 + o2_off, o2.to(O2.dtype.element_ty), mask=row_ok[:, None])
        lse_ptrs = LSE + (b * 2 * n_pairs + 2 * i) * T + rows  # (B, 2h, T) contiguous, log2 units
        tl.store(lse_ptrs, m1 + tl.log2(l1), mask=row_ok)
        tl.store(lse_ptrs + T, m2 + tl.log2(l2), mask=row_ok)

    @triton.jit
    def _diff_attn_bwd_pre_kernel(
        DOUT, OUT, O2, W, DELTA, DW,
        sdb, sdh, sdt, sob, soh, sot, s2b, s2h, s2t, swb, swh, swt, sgb, sgh, sgt,
        n_pairs, T, D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, i = (pid_bh // n_pairs).to(tl.int64), pid_bh % n_pairs
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < T
        dd = tl.arange(0, D)
        off = rows[:, None] * sdt + dd[None, :]
        do = tl.load(DOUT + b * sdb + i * sdh + off, mask=ok[:, None], other=0.0).to(tl.float32)
        off = rows[:, None] * sot + dd[None, :]
        out = tl.load(OUT + b * sob + i * soh + off, mask=ok[:, None], other=0.0).to(tl.float32)
        off = rows[:, None] * s2t + dd[None, :]
        o2 = tl.load(O2 + b * s2b + i * s2h + off, mask=ok[:, None], other=0.0).to(tl.float32)
        w = tl.load(W + b * swb + i * swh + rows * swt, mask=ok, other=0.0)
        dot_out, dot_o2 = tl.sum(do * out, 1), tl.sum(do * o2, 1)
        delta = DELTA + (b * 2 * n_pairs + 2 * i) * T + rows
        tl.store(delta, dot_out + w * dot_o2, mask=ok)  # Σ dout·o1, o1 = out + w·o2
        tl.store(delta + T, -w * dot_o2, mask=ok)  # Σ dO2·o2 with dO2 = −w·dout
        tl.store(DW + b * sgb + i * sgh + rows * sgt, -dot_o2, mask=ok)

    @triton.jit
    def _diff_attn_bwd_dkdv_kernel(
        Q, K, V, W, DOUT, LSE, DELTA, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, swb, swh, swt, sdb, sdh, sdt,
        sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, n_pairs, T, qk_scale, sm_scale,
        GROUP_PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_n, pid_bk = tl.program_id(0), tl.program_id(1)
        n_kv = n_pairs // GROUP_PAIRS
        b, hk = (pid_bk // n_kv).to(tl.int64), (pid_bk % n_kv).to(tl.int64)
        start_n = pid_n * BLOCK_N
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < T
        dd = tl.arange(0, D)
        kt = tl.load(K + b * skb + hk * skh + keys[:, None] * skt + dd[None, :], mask=key_ok[:, None], other=0.0)
        vt = tl.load(V + b * svb + hk * svh + keys[:, None] * svt + dd[None, :], mask=key_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # every (pair of the group, query block from the diagonal on) in one flat loop, the causal mask always
        # applied (a few elementwise ops): nested loops over pairs and blocks kept ~2x the registers live (spills)
        lo = (start_n // BLOCK_M) * BLOCK_M
        n_blocks = tl.cdiv(T - lo, BLOCK_M)
        for it in range(0, GROUP_PAIRS * n_blocks):
            i = hk * GROUP_PAIRS + it // n_blocks  # both members of every pair in the group read this KV head
            rows = lo + (it % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
            ok = rows < T
            q_ptrs = Q + b * sqb + 2 * i * sqh + rows[:, None] * sqt + dd[None, :]
            q1 = tl.load(q_ptrs, mask=ok[:, None], other=0.0)
            q2 = tl.load(q_ptrs + sqh, mask=ok[:, None], other=0.0)
            do = tl.load(DOUT + b * sdb + i * sdh + rows[:, None] * sdt + dd[None, :], mask=ok[:, None], other=0.0)
            w = tl.load(W + b * swb + i * swh + rows * swt, mask=ok, other=0.0)
            stat = (b * 2 * n_pairs + 2 * i) * T + rows
            # scores transposed, (BLOCK_N keys, BLOCK_M queries); a query past T gets lse = +inf, hence p = 0
            lse1 = tl.load(LSE + stat, mask=ok, other=float("inf"))
            lse2 = tl.load(LSE + stat + T, mask=ok, other=float("inf"))
            dl1 = tl.load(DELTA + stat, mask=ok, other=0.0)
            dl2 = tl.load(DELTA + stat + T, mask=ok, other=0.0)
            allowed = rows[None, :] >= keys[:, None]
            s1 = tl.dot(kt, tl.trans(q1), input_precision=PRECISION) * qk_scale
            s2 = tl.dot(kt, tl.trans(q2), input_precision=PRECISION) * qk_scale
            p1 = tl.exp2(tl.where(allowed, s1, float("-inf")) - lse1[None, :])
            p2 = tl.exp2(tl.where(allowed, s2, float("-inf")) - lse2[None, :])
            # dV = p1ᵀ·dout + p2ᵀ·(−w·dout): one product for the pair; likewise dP1 = dp and dP2 = −w·dp
            dv += tl.dot((p1 - p2 * w[None, :]).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
            ds1 = p1 * (dp - dl1[None, :])
            ds2 = p2 * (-w[None, :] * dp - dl2[None, :])
            dk += tl.dot(ds1.to(q1.dtype), q1, input_precision=PRECISION)
            dk += tl.dot(ds2.to(q2.dtype), q2, input_precision=PRECISION)
        dk_ptrs = DK + b * sdkb + hk * sdkh + keys[:, None] * sdkt + dd[None, :]
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        dv_ptrs = DV + b * sdvb + hk * sdvh + keys[:, None] * sdvt + dd[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])

    @triton.jit
    def _dq_step(
        q1,
        q2,
        do,
        w,
        lse1,
        lse2,
        dl1,
        dl2,
        kt,
        vt,
        dq1,
        dq2,
        allowed,
        qk_scale,
        MASKED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        s1 = tl.dot(q1, tl.trans(kt), input_precision=PRECISION) * qk_scale
        s2 = tl.dot(q2, tl.trans(kt), input_precision=PRECISION) * qk_scale
        if MASKED:
            s1 = tl.where(allowed, s1, float("-inf"))
            s2 = tl.where(allowed, s2, float("-inf"))
        p1 = tl.exp2(s1 - lse1[:, None])
        p2 = tl.exp2(s2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds1 = p1 * (dp - dl1[:, None])
        ds2 = p2 * (-w[:, None] * dp - dl2[:, None])
        dq1 += tl.dot(ds1.to(kt.dtype), kt, input_precision=PRECISION)
        dq2 += tl.dot(ds2.to(kt.dtype), kt, input_precision=PRECISION)
        return dq1, dq2

    @triton.jit
    def _diff_attn_bwd_dq_kernel(
        Q, K, V, W, DOUT, LSE, DELTA, DQ,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, swb, swh, swt, sdb, sdh, sdt, sgb, sgh, sgt,
        n_pairs, T, qk_scale, sm_scale,
        GROUP_PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        b, i, start_m, rows, ok, dd, q1, q2 = _query_pair_block(Q, sqb, sqh, sqt, n_pairs, T, D, BLOCK_M)
        do = tl.load(DOUT + b * sdb + i * sdh + rows[:, None] * sdt + dd[None, :], mask=ok[:, None], other=0.0)
        w = tl.load(W + b * swb + i * swh + rows * swt, mask=ok, other=0.0)
        stat = (b * 2 * n_pairs + 2 * i) * T + rows
        lse1, lse2 = tl.load(LSE + stat, mask=ok, other=0.0), tl.load(LSE + stat + T, mask=ok, other=0.0)
        dl1, dl2 = tl.load(DELTA + stat, mask=ok, other=0.0), tl.load(DELTA + stat + T, mask=ok, other=0.0)
        hk = (i // GROUP_PAIRS).to(tl.int64)
        k_base, v_base = K + b * skb + hk * skh, V + b * svb + hk * svh
        dq1 = tl.zeros([BLOCK_M, D], tl.float32)
        dq2 = tl.zeros([BLOCK_M, D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        mid = (start_m // BLOCK_N) * BLOCK_N
        for n0 in range(0, mid, BLOCK_N):
            keys = n0 + cols
            kt = tl.load(k_base + keys[:, None] * skt + dd[None, :])
            vt = tl.load(v_base + keys[:, None] * svt + dd[None, :])
            dq1, dq2 = _dq_step(q1, q2, do, w, lse1, lse2, dl1, dl2, kt, vt, dq1, dq2, None, qk_scale, False, PRECISION)
        for n0 in range(mid, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
            keys = n0 + cols
            kt = tl.load(k_base + keys[:, None] * skt + dd[None, :], mask=(keys < T)[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * svt + dd[None, :], mask=(keys < T)[:, None], other=0.0)
            allowed = keys[None, :] <= rows[:, None]
            dq1, dq2 = _dq_step(
                q1, q2, do, w, lse1, lse2, dl1, dl2, kt, vt, dq1, dq2, allowed, qk_scale, True, PRECISION
            )
        dq_ptrs = DQ + b * sgb + (2 * i).to(tl.int64) * sgh + rows[:, None] * sgt + dd[None, :]
        tl.store(dq_ptrs, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])
        tl.store(dq_ptrs + sgh, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])

    def _grad_like(x: torch.Tensor) -> torch.Tensor:
        """x's layout (a dense transposed view stays one: no copy on the way back) unless d is strided."""
        return torch.empty_like(x) if x.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
        """The (batch, head, time) strides of each tensor in turn: the kernels' stride arguments."""
        return tuple(stride for x in tensors for stride in x.stride()[:3])

    def _new_out(q: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) as a transposed (B, T, h, d) buffer: the model's ``ctx.transpose(1, 2)`` is then free."""
        b, hq, t, d = q.shape
        return q.new_empty((b, t, hq // 2, d)).transpose(1, 2)

    @torch.library.custom_op(
        "diffv2::diff_attn_fwd",
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor w, float scale) -> (Tensor, Tensor, Tensor)",
    )
    def _diff_attn_fwd(q, k, v, w, scale):
        """w: (B, h, T) fp32. Returns (out (B, h, T, d), o2 (B, h, T, d), lse (B, 2h, T) fp32 in log2 units); o2
        and lse feed the backward only."""
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)  # the kernels index d with unit stride
        b, hq, t, d = q.shape
        out, o2 = _new_out(q), q.new_empty((b, hq // 2, t, d))
        lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
        cfg = _config("fwd", q)
        args = (q, k, v, w, out, o2, lse, *_strides(q, k, v, w, out, o2), hq // 2, t, scale * math.log2(math.e))
        _diff_attn_fwd_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), b * hq // 2)](
            *args, GROUP_PAIRS=hq // k.shape[1] // 2, D=d, **cfg
        )
        return out, o2, lse

    @_diff_attn_fwd.register_fake
    def _(q, k, v, w, scale):
        b, hq, t, d = q.shape
        return _new_out(q), q.new_empty((b, hq // 2, t, d)), q.new_empty((b, hq, t), dtype=torch.float32)

    @torch.library.custom_op(
        "diffv2::diff_attn_bwd",
        mutates_args=(),
        schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor w, Tensor out, Tensor o2, Tensor lse, float scale)"
        " -> (Tensor, Tensor, Tensor, Tensor)",
    )
    def _diff_attn_bwd(dout, q, k, v, w, out, o2, lse, scale):
        """Returns (dq, dk, dv, dw), each in its input's layout (where d has unit stride)."""
        b, hq, t, d = q.shape
        h = hq // 2
        dq, dk, dv, dw = _grad_like(q), _grad_like(k), _grad_like(v), torch.empty_like(w)
        dout, q, k, v, out, o2 = (_unit_last(x) for x in (dout, q, k, v, out, o2))
        delta = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
        args = (dout, out, o2, w, delta, dw, *_strides(dout, out, o2, w, dw), h, t)
        _diff_attn_bwd_pre_kernel[(triton.cdiv(t, 64), b * h)](*args, D=d, BLOCK_M=64, num_warps=4)
        strides, scales = _strides(q, k, v, w, dout), (scale * math.log2(math.e), scale)
        common = dict(GROUP_PAIRS=hq // k.shape[1] // 2, D=d)
        cfg = _config("dkdv", q)
        args = (q, k, v, w, dout, lse, delta, dk, dv, *strides, *_strides(dk, dv), h, t, *scales)
        _diff_attn_bwd_dkdv_kernel[(triton.cdiv(t, cfg["BLOCK_N"]), b * k.shape[1])](*args, **common, **cfg)
        cfg = _config("dq", q)
        args = (q, k, v, w, dout, lse, delta, dq, *strides, *_strides(dq), h, t, *scales)
        _diff_attn_bwd_dq_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), b * h)](*args, **common, **cfg)
        return dq, dk, dv, dw

    @_diff_attn_bwd.register_fake
    def _(dout, q, k, v, w, out, o2, lse, scale):
        return _grad_like(q), _grad_like(k), _grad_like(v), torch.empty_like(w)

    def _setup_context(ctx, inputs, output):
        q, k, v, w, scale = inputs
        out, o2, lse = output
        ctx.save_for_backward(q, k, v, w, out, o2, lse)
        ctx.scale = scale

    def _backward(ctx, dout, _grad_o2, _grad_lse):
        # o2 and lse are internal (diff_attention returns out only), so their gradients are never set
        q, k, v, w, out, o2, lse = ctx.saved_tensors
        dq, dk, dv, dw = torch.ops.diffv2.diff_attn_bwd(dout, q, k, v, w, out, o2, lse, ctx.scale)
        return dq, dk, dv, dw, None

    _diff_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
