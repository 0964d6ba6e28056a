"""Split-KV ("flash-decoding") attention for a few queries over a static KV cache, in Triton.

Why a kernel of our own: SDPA's fused kernels do not take GQA together with a mask, so a padded batch or a
static (CUDA-graph) cache fell back to a compiled reduction that reads the cache at ~150 GB/s. Here the valid
keys of row b are the window ``[kv_start[b], kv_end[b])`` (left padding before it, unwritten slots after it),
passed as two (B,) device tensors instead of a (B, 1, T, S) mask: no host sync, fixed shapes.

Layout of the work:
- grid (num_splits, Hkv, B): one program takes a whole GQA group (G = Hq/Hkv query heads × T queries, the
  rows of one tile, padded to >= 16 for ``tl.dot``) against one chunk of its row's window, so every K/V byte
  is read once per group, never once per query head;
- each program runs an online softmax in fp32 (exp2, log2 units) and writes its normalised partial output
  and log-sum-exp; a second small kernel merges the splits. With one split the first kernel writes the
  result itself (no workspace, one launch);
- optional int8 cache (:mod:`.kv_int8`): K/V tiles load as int8 (half a bf16 cache's bytes) with one fp32
  scale per key; the int8 values convert exactly to the compute dtype, and the scales multiply the columns of the
  scores (K) and of the probabilities (V), which is the dequantised product without a dequantised tile;
- optional DIFF V2 epilogue: with ``pair_weight`` w (B, h, T) the kernel returns out_i = o_2i − w_i·o_2i+1
  (B, h, T, d) in fp32 before the final cast; a pair sits in one group because G = 2h/h_kv is even.

The launch is a ``torch.library.custom_op`` with a fake impl, so ``torch.compile(fullgraph=True)`` keeps it
in the graph (no break) and CUDA graphs capture it (no host sync, shapes fixed by the inputs). It runs where
:func:`triton_supported` says (CUDA, or Triton's CPU interpreter in tests); :mod:`diffv2.attention.dispatch`
picks it. Inference only: no backward.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .kv_int8 import QuantizedKV

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatcher never picks this kernel there
    triton = None

HAS_TRITON = triton is not None
MAX_SPLITS = 128  # beyond this the merge costs more than the extra parallelism buys
MIN_KEYS_PER_SPLIT = 256  # below this a split's partial output (fp32) costs a sizeable share of its K/V bytes
SHORT_SPLITS = 16  # a short cache at tiny batch is latency-bound: spread it anyway
MAX_ROWS = 128  # G·T rows per tile: keeps the fp32 accumulator (rows × d) in registers


# Triton reads the variable when it decorates the kernels (at import), so it is read once here as well
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these inputs: a device Triton runs on (CUDA, or the CPU interpreter under
    ``TRITON_INTERPRET=1``), and shapes and dtypes it handles."""
    if not HAS_TRITON:
        return False
    on_device = q.is_cuda or (_INTERPRET and q.device.type == "cpu")
    d = q.shape[-1]
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    return (
        on_device
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype in (q.dtype, torch.int8)  # int8: a quantised cache (with its scales)
        and v.dtype == k.dtype
        and 16 <= d <= 256
        and d & (d - 1) == 0  # tl.arange needs a power of two; 64 and 128 are the cases that matter
        and v.shape[-1] == d
        and rows <= MAX_ROWS
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: keep auto splits few (tests that need the merge pass num_splits)
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, n_kv_heads: int, seq_len: int, device: torch.device) -> int:
    """Enough programs for ~2 resident per SM (132 SMs on an H200), each over >= MIN_KEYS_PER_SPLIT keys, but
    at least SHORT_SPLITS splits (of >= 64 keys) when that cap leaves a short cache on a few programs.

    Depends on shapes only (never on kv_end), so a captured CUDA graph stays valid as the cache fills. Tuned
    on the sweep of ``bench/decode_kernel.py --sweep`` (docs/benchmarks.md#decode-kernel): at batch 1, fewer
    splits than SMs/2 left short caches on too few programs.
    """
    want = max(1, 2 * _sm_count(device) // (batch * n_kv_heads))
    by_keys = max(-(-seq_len // MIN_KEYS_PER_SPLIT), min(SHORT_SPLITS, -(-seq_len // 64)))
    return max(1, min(want, by_keys, MAX_SPLITS))


def _config(d: int, rows: int, elem_bytes: int) -> dict[str, int]:
    """Tile sizes: 16 KB of K (and of V) per step, so 3 pipeline stages take ~96 KB of shared memory (two
    programs per SM); more warps once the fp32 accumulator (rows × d) gets large."""
    block_n = max(16, min(128, 16384 // (d * elem_bytes)))
    block_m = max(16, triton.next_power_of_2(rows))
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "num_warps": 8 if block_m * d >= 64 * 128 else 4, "num_stages": 3}


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    v: torch.Tensor | QuantizedKV,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    *,
    pair_weight: torch.Tensor | None = None,
    pair_sigmoid: bool = False,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of T (<= 16) queries per row over a KV cache window. q: (B, Hq, T, d); k, v: (B, Hkv, S, d)
    (strided views are fine), or both :class:`~diffv2.kernels.kv_int8.QuantizedKV` (an int8 cache, read as int8
    tiles and their scales); kv_start/kv_end: (B,) int tensors (default 0 and S). Returns (B, Hq, T, d), or with
    ``pair_weight`` (B, Hq/2, T) the DIFF V2 heads o_2i − w_i·o_2i+1, (B, Hq/2, T, d); in q's dtype.
    ``pair_sigmoid``: ``pair_weight`` holds λ and the kernel takes w = σ(λ) itself (in fp32), which saves
    decode two small launches per layer (the cast and the sigmoid).
    A row whose window is empty (for a query) gets zeros, as
    :func:`~diffv2.kernels.softmax_attention.eager_attention` gives."""
    if isinstance(k, QuantizedKV) != isinstance(v, QuantizedKV):
        raise ValueError("decode_attention_triton: K and V must both be quantised or neither")
    k_scale = v_scale = None
    if isinstance(k, QuantizedKV):
        k, k_scale, v, v_scale = k.data, _unit_last(k.scale), v.data, _unit_last(v.scale)
    elif k.dtype == torch.int8:
        raise ValueError("decode_attention_triton: int8 K/V come with their scales, as a QuantizedKV")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scales_fit = k_scale is None or k_scale.shape == v_scale.shape == k.shape[:3]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or hq % hkv or not scales_fit:
        raise ValueError(f"decode_attention_triton: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if pair_sigmoid and pair_weight is None:
        raise ValueError("pair_sigmoid=True needs pair_weight: the λ whose sigmoid weighs each pair")
    if pair_weight is not None and (pair_weight.shape != (b, hq // 2, t) or (hq // hkv) % 2):
        raise ValueError(f"pair_weight must be (B, Hq/2, T) = {(b, hq // 2, t)} with an even group size")
    if kv_start is None:
        kv_start = torch.zeros(b, dtype=torch.int32, device=q.device)
    if kv_end is None:
        kv_end = torch.full((b,), s, dtype=torch.int32, device=q.device)
    if kv_start.shape != (b,) or kv_end.shape != (b,) or kv_start.device != q.device or kv_end.device != q.device:
        raise ValueError(
            f"kv_start/kv_end must be (B,) = ({b},) on {q.device}, got {tuple(kv_start.shape)} on {kv_start.device}, "
            f"{tuple(kv_end.shape)} on {kv_end.device}"
        )
    scale = d**-0.5 if scale is None else float(scale)
    if not triton_supported(q, k, v):
        raise ValueError(
            f"decode_attention_triton: Triton cannot run q{tuple(q.shape)} {q.dtype} on {q.device} "
            "(see triton_supported)"
        )
    # the kernels index the last dim with unit stride; cache views (k[:, 0::2], k[layer]) already have it
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    kv_start, kv_end = kv_start.contiguous(), kv_end.contiguous()  # the kernel reads element b at offset b
    return torch.ops.diffv2.flash_decode(
        q, k, v, k_scale, v_scale, kv_start, kv_end, pair_weight, pair_sigmoid, scale, num_splits or 0
    )


if HAS_TRITON:
    # A kernel's signature keeps its layout (fmt: skip), one line per role: the tensors, each tensor's strides,
    # the sizes, the compile-time constants; the launches pass them in the same order.
    @triton.jit
    def _split_kernel(
        Q, K, V, KS, VS, START, END, W, OUT, PART, LSE,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ksb, stride_ksh, stride_vsb, stride_vsh,
        stride_wb, stride_wh, stride_wt, stride_ob, stride_oh, stride_ot,
        seq_len, num_splits, qk_scale,
        G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, PAIR: tl.constexpr, SIGMOID: tl.constexpr, PRECISION: tl.constexpr,
        QUANT: tl.constexpr,
    ):  # fmt: skip
        split, hk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)  # batch offsets of a 64-row, 32k-slot cache overflow int32
        # rows are t-major (r = t·G + g) so that a DIFF V2 pair (2j, 2j+1) is two adjacent rows
        rows = tl.arange(0, BLOCK_M)
        g, t = rows % G, rows // G
        row_ok = rows < G * T
        head = hk * G + g
        dd = tl.arange(0, D)
        q_ptrs = Q + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qt + dd[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

        start = tl.maximum(tl.load(START + b).to(tl.int32), 0)
        end = tl.minimum(tl.load(END + b).to(tl.int32), seq_len)
        # this program's chunk of the window, a whole number of tiles; trailing splits may be empty
        chunk = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), num_splits), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        limit = tl.minimum(end - (T - 1) + t, hi)  # causal inside the window: query t sees keys < limit

        # a finite start for the running max keeps exp2(m_old - m_new) free of (-inf) - (-inf) = NaN
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
        ks_base = KS + b64 * stride_ksb + hk.to(tl.int64) * stride_ksh  # scales: unit stride over slots
        vs_base = VS + b64 * stride_vsb + hk.to(tl.int64) * stride_vsh
        cols = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + cols
            in_chunk = (keys < hi)[:, None]
            kt = tl.load(k_base + keys[:, None] * stride_ks + dd[None, :], mask=in_chunk, other=0.0)
            if QUANT:  # int8 -> q's dtype is exact; each key's scale then multiplies its column of scores
                kt = kt.to(q.dtype)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            if QUANT:
                s = s * tl.load(ks_base + keys, mask=keys < hi, other=0.0)[None, :]
            s = tl.where(keys[None, :] < limit[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + keys[:, None] * stride_vs + dd[None, :], mask=in_chunk, other=0.0)
            if QUANT:  # Σ p_n·(s_n·v_n) = Σ (p_n·s_n)·v_n: the V scales weigh the probabilities (after l_i)
                vt = vt.to(q.dtype)
                p = p * tl.load(vs_base + keys, mask=keys < hi, other=0.0)[None, :]
            # probabilities in the cache dtype (bf16/fp16) feed the tensor cores, as in flash attention
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]  # a row that saw no key has acc = 0, hence zeros
        if DIRECT:
            if PAIR:
                # (r, d) -> (pair, 2, d) -> (pair, d, 2) -> the two members; all still fp32
                o_even, o_odd = tl.split(tl.permute(tl.reshape(o, (BLOCK_M // 2, 2, D)), (0, 2, 1)))
                pr = tl.arange(0, BLOCK_M // 2)
                j, tp = pr % (G // 2), pr // (G // 2)
                out_head = hk * (G // 2) + j
                pr_ok = pr < (G // 2) * T
                w = tl.load(W + b64 * stride_wb + out_head * stride_wh + tp * stride_wt, mask=pr_ok, other=0.0)
                w = w.to(tl.float32)
                if SIGMOID:
                    w = tl.sigmoid(w)
                res = o_even - w[:, None] * o_odd
                o_ptrs = OUT + b64 * stride_ob + out_head[:, None].to(tl.int64) * stride_oh
                o_ptrs += tp[:, None] * stride_ot + dd[None, :]
                tl.store(o_ptrs, res.to(OUT.dtype.element_ty), mask=pr_ok[:, None])
            else:
                o_ptrs = OUT + b64 * stride_ob + head[:, None].to(tl.int64) * stride_oh
                o_ptrs += t[:, None] * stride_ot + dd[None, :]
                tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        else:
            # workspace rows (b, head, t, split), contiguous
            idx = ((b64 * (G * tl.num_programs(1)) + head) * T + t) * num_splits + split
            tl.store(PART + idx[:, None] * D + dd[None, :], o, mask=row_ok[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(LSE + idx, lse, mask=row_ok)

    @triton.jit
    def _merge_row(PART, LSE, row, num_splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Log-sum-exp merge of one (b, head, t) row's split results: (D,) fp32."""
        ss = tl.arange(0, BLOCK_S)
        dd = tl.arange(0, D)
        base = row * num_splits
        # pass 1: the largest log-sum-exp, so that pass 2 needs no rescaling
        m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            lse = tl.load(LSE + base + s0 + ss, mask=s0 + ss < num_splits, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        m = tl.max(m_vec, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights below are exp2(-inf) = 0
        acc = tl.zeros([D], tl.float32)
        l_vec = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            ok = s0 + ss < num_splits
            w = tl.exp2(tl.load(LSE + base + s0 + ss, mask=ok, other=float("-inf")) - m)
            part = tl.load(PART + (base + s0 + ss)[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
            acc += tl.sum(w[:, None] * part, 0)
            l_vec += w
        l_sum = tl.sum(l_vec, 0)
        return acc / tl.where(l_sum > 0, l_sum, 1.0)

    @triton.jit
    def _combine_kernel(
        PART, LSE, W, OUT, stride_wb, stride_wh, stride_wt, stride_ob, stride_oh, stride_ot, n_q_heads, num_splits,
        T: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, PAIR: tl.constexpr, SIGMOID: tl.constexpr,
    ):  # fmt: skip
        t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        if PAIR:  # output head h = query heads 2h and 2h+1, whose rows are T apart
            row = (b64 * n_q_heads + 2 * h) * T + t
            w = tl.load(W + b64 * stride_wb + h * stride_wh + t * stride_wt).to(tl.float32)
            if SIGMOID:
                w = tl.sigmoid(w)
            o = _merge_row(PART, LSE, row, num_splits, D, BLOCK_S)
            o -= w * _merge_row(PART, LSE, row + T, num_splits, D, BLOCK_S)
        else:
            o = _merge_row(PART, LSE, (b64 * n_q_heads + h) * T + t, num_splits, D, BLOCK_S)
        dd = tl.arange(0, D)
        tl.store(OUT + b64 * stride_ob + h * stride_oh + t * stride_ot + dd, o.to(OUT.dtype.element_ty))

    @torch.library.custom_op(
        "diffv2::flash_decode",
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor? k_scale, Tensor? v_scale, Tensor kv_start, Tensor kv_end, "
        "Tensor? pair_weight, bool pair_sigmoid, float scale, int num_splits) -> Tensor",
    )
    def _flash_decode(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None,
        kv_start: torch.Tensor,
        kv_end: torch.Tensor,
        pair_weight: torch.Tensor | None,
        pair_sigmoid: bool,
        scale: float,
        num_splits: int,
    ) -> torch.Tensor:
        # An opaque custom op (not triton_op): inductor then never parses the kernels to guess which inputs
        # they mutate (a failed guess would make it copy the KV cache) and dynamo uses the fake impl below.
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        g = hq // hkv
        pair = pair_weight is not None
        out = q.new_empty((b, hq // 2 if pair else hq, t, d))
        ns = num_splits if num_splits > 0 else choose_num_splits(b, hkv, s, q.device)
        ns = max(1, min(ns, MAX_SPLITS))
        cfg = _config(d, g * t, q.element_size())
        if ns == 1:
            part = lse = out  # unused: the split kernel writes the result itself
        else:
            part = torch.empty((b, hq, t, ns, d), dtype=torch.float32, device=q.device)
            lse = torch.empty((b, hq, t, ns), dtype=torch.float32, device=q.device)
        w = pair_weight if pair_weight is not None else q  # a placeholder pointer when there is no epilogue
        w_strides = pair_weight.stride() if pair_weight is not None else (0, 0, 0)
        quant = k_scale is not None
        ks, vs = (k_scale, v_scale) if quant else (q, q)  # placeholder pointers for a full-precision cache
        scale_strides = (*k_scale.stride()[:2], *v_scale.stride()[:2]) if quant else (0, 0, 0, 0)
        _split_kernel[(ns, hkv, b)](
            *(q, k, v, ks, vs, kv_start, kv_end, w, out, part, lse),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *scale_strides,
            *w_strides,
            *out.stride()[:3],
            s,
            ns,
            scale * math.log2(math.e),
            G=g,
            T=t,
            D=d,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            DIRECT=ns == 1,
            PAIR=pair,
            SIGMOID=pair_sigmoid,
            QUANT=quant,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: exact, not TF32 products
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        if ns > 1:
            # all splits of a row in one tile (ns <= MAX_SPLITS): two dependent loads instead of a serial loop
            block_s = triton.next_power_of_2(ns)
            _combine_kernel[(t, out.shape[1], b)](
                part,
                lse,
                w,
                out,
                *w_strides,
                out.stride(0),
                out.stride(1),
                out.stride(2),
                hq,
                ns,
                T=t,
                D=d,
                BLOCK_S=block_s,
                PAIR=pair,
                SIGMOID=pair_sigmoid,
                num_warps=4 if block_s * d <= 32 * 128 else 8,
            )
        return out

    @_flash_decode.register_fake
    def _(q, k, v, k_scale, v_scale, kv_start, kv_end, pair_weight, pair_sigmoid, scale, num_splits):
        b, hq, t, d = q.shape
        return q.new_empty((b, hq // 2 if pair_weight is not None else hq, t, d))
