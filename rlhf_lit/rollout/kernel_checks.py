"""Input checks of the decode kernels (:mod:`rlhf_lit.rollout.decode_kernels`), and which kernels
take a head dim.

Each check raises :class:`ValueError` naming the argument, what it must be and what it got. Index
values held in device tensors are range-checked on the host, except while a CUDA graph is being
captured (reading them is not allowed then).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def _rows(x: Tensor, name: str) -> None:
    """A 2-D floating-point tensor whose rows are contiguous and do not overlap."""
    if not isinstance(x, Tensor) or x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1) \
            or (x.shape[0] > 1 and x.stride(0) < x.shape[1]) or not x.is_floating_point():
        got = f"{x.dtype} shape {tuple(x.shape)} strides {x.stride()}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D floating-point tensor with contiguous, non-overlapping rows, "
                         f"got {got}")


def _count(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _same_device(ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():  # a non-tensor is named by the check made for it
        if isinstance(t, Tensor) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, the other inputs on {ref.device}")


def _index(t: Tensor, name: str, numel: int, upper: int, what: str) -> None:
    """``t``: an int64 tensor of ``numel`` elements with values in [0, upper) (checked on the host
    unless a CUDA graph is being captured)."""
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1 or t.numel() != numel \
            or not t.is_contiguous():
        got = f"{t.dtype} of {t.numel()} elements, strides {t.stride()}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a contiguous 1-D int64 tensor of {numel} element(s) ({what}), got {got}")
    if numel == 0 or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} holds {lo}..{hi}: {what} must be in [0, {upper})")


def _cache(k_cache: Tensor, v_cache: Tensor, shape: tuple) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, Tensor) or tuple(c.shape) != shape or c.stride(-1) != 1 \
                or any(st == 0 and n > 1 for st, n in zip(c.stride(), c.shape)) or not c.is_floating_point():
            got = f"{c.dtype} shape {tuple(c.shape)} strides {c.stride()}" if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{name} must be a floating-point tensor of shape {shape} (batch, KV heads, columns, "
                             f"head dim), last dim contiguous, not expanded, got {got}")
    if k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share strides and dtype, got {k_cache.stride()} "
                         f"{k_cache.dtype} and {v_cache.stride()} {v_cache.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if _overlaps_itself(c):
            raise ValueError(f"{name}'s elements overlap in memory (strides {c.stride()} for shape {tuple(c.shape)}): "
                             "a cache column written for one row or head would change another")
    if k_cache.numel() and k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr():
        (k0, k1), (v0, v1) = _byte_range(k_cache), _byte_range(v_cache)
        if k0 < v1 and v0 < k1:
            raise ValueError("k_cache and v_cache share memory: each needs its own (writing k would change v)")


def _byte_range(t: Tensor) -> tuple[int, int]:
    """The bytes of ``t``'s storage its elements span, ``[first, last + 1)``."""
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    first = t.storage_offset() * t.element_size()
    return first, first + (span + 1) * t.element_size()


def _overlaps_itself(t: Tensor) -> bool:
    """Two indices of ``t`` address one element (strides >= 0): checked dimension by dimension from
    the smallest stride, each stride must step past everything the smaller ones reach."""
    reach = 0
    for n, st in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda d: d[1]):
        if st <= reach:
            return True
        reach += (n - 1) * st
    return False


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class HeadDimSupport(NamedTuple):
    """Which kernels take a head dim ``D`` (the engine runs torch ops for the others)."""

    rope: bool  #: :func:`rope_qkv_cache_write`: ``D / 2`` a power of two
    attention: bool  #: :func:`decode_attention`: ``D`` a power of two >= 16
    rope_attention: bool  #: :func:`rope_attention`: ``D / 2`` a power of two >= 16


def head_dim_support(head_dim: int) -> HeadDimSupport:
    """The kernels that apply to heads of ``head_dim`` (tl.dot needs 16-wide operands; the
    kernels' ``tl.arange`` spans a power of two)."""
    half_ok = head_dim % 2 == 0 and _pow2(head_dim // 2)
    return HeadDimSupport(rope=half_ok, attention=_pow2(head_dim) and head_dim >= 16,
                          rope_attention=half_ok and head_dim >= 32)


def _mask(mask: Tensor, name: str, B: int, L: int) -> None:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, 1, 1, L) or mask.stride(-1) != 1 \
            or not mask.is_floating_point():
        got = f"{mask.dtype} shape {tuple(mask.shape)} strides {mask.stride()}" if isinstance(mask, Tensor) \
            else type(mask)
        raise ValueError(f"{name} must be a floating-point additive mask (0 where attended, a large negative "
                         f"where not; not SDPA's boolean keep-mask) of shape ({B}, 1, 1, {L}) with a contiguous "
                         f"last dim, got {got}")


def _attention_launch(scale, block_n, num_warps, num_stages) -> float:
    """The attention kernels' scale (returned as a float) and launch settings, checked."""
    scale = _finite(scale, "scale")
    if abs(scale) > torch.finfo(torch.float32).max:
        raise ValueError(f"scale {scale!r} is not a finite float32 (the kernels multiply in float32)")
    if not _pow2(_count(block_n, "block_n", 16)) or block_n > 1024:
        raise ValueError(f"block_n must be a power of two in 16..1024, got {block_n}")
    if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if not 1 <= _count(num_stages, "num_stages") <= 8:
        raise ValueError(f"num_stages must be an integer in 1..8, got {num_stages}")
    return scale


def _rope_inputs(y, cos, sin_signed, pos, col, k_cache, v_cache, n_heads, n_kv_heads, bias) -> tuple[int, int]:
    """The checks of :func:`rope_qkv_cache_write`'s inputs (also :func:`rope_attention`'s); returns
    ``(B, D / 2)``."""
    _rows(y, "y")
    B, width = y.shape
    _count(n_heads, "n_heads")
    _count(n_kv_heads, "n_kv_heads")
    for name, t in (("cos", cos), ("sin_signed", sin_signed)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.stride(-1) != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (positions, head dim) table with a contiguous last dim")
    if cos.shape != sin_signed.shape or cos.stride() != sin_signed.stride() or cos.dtype != sin_signed.dtype:
        raise ValueError(f"cos ({cos.dtype} {tuple(cos.shape)}) and sin_signed ({sin_signed.dtype} "
                         f"{tuple(sin_signed.shape)}) must have one dtype, shape and strides")
    T, D = cos.shape
    half = D // 2
    if not head_dim_support(D).rope or width != (n_heads + 2 * n_kv_heads) * D:
        raise ValueError(f"y of width {width} must be (n_heads + 2 * n_kv_heads) * D = ({n_heads} + 2 * "
                         f"{n_kv_heads}) * {D}, with D / 2 a power of two (D from the cos table)")
    L = k_cache.shape[2] if isinstance(k_cache, Tensor) and k_cache.dim() == 4 else -1
    _cache(k_cache, v_cache, (B, n_kv_heads, L, D))
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (width,) or bias.stride(0) != 1
                             or not bias.is_floating_point()):
        got = f"{bias.dtype} shape {tuple(bias.shape)} strides {bias.stride()}" if isinstance(bias, Tensor) \
            else type(bias)
        raise ValueError(f"bias must be a contiguous floating-point ({width},) tensor, got {got}")
    _same_device(y, cos=cos, sin_signed=sin_signed, pos=pos, col=col, k_cache=k_cache, v_cache=v_cache,
                 **({"bias": bias} if bias is not None else {}))
    _index(pos, "pos", B, T, "each row's position, a row of the cos/sin tables")
    _index(col, "col", 1, L, "the cache column")
    return B, half
