"""Linear attention with exponential decay (TransNormerLLM), in three equivalent forms.

For one head with decay rate s (lambda = exp(-s)), queries q_t, keys k_t and values v_t:

    o_t = q_t S_t,        S_t = lambda S_{t-1} + k_t^T v_t,        S_{-1} = S0 (default 0)

that is o_t = sum_{j<=t} lambda^{t-j} (q_t . k_j) v_j + lambda^{t+1} q_t S0.

* :func:`naive_decay_attention` builds the (T, T) decay matrix D[t, j] = lambda^{t-j} (j <= t)
  and computes ((Q K^T) * D) V: O(T^2 d), the reference.
* :func:`recurrent_decay_attention` runs the recurrence token by token: O(T d^2), the decode step.
* :func:`lightning_attention` is Lightning Attention-2 (Qin et al. 2024, Algorithm 1) in plain
  torch: per block of b tokens an intra-block part ((Q_i K_i^T) * D_b) V_i and an inter-block part
  Lambda Q_i KV using the running (dk, dv) state KV, updated once per block:
  KV <- lambda^b KV + (diag(lambda^{b-1-j}) K_i)^T V_i. O(T b d + T d^2).

All three accept an initial state (chunked prefill, cached decoding) and the blocked and recurrent
forms return the final state. Every decay factor is computed as exp(-s * n) with n >= 0, never
as a ratio of powers, so nothing overflows for large blocks or fast-decaying heads.

Shapes: q, k (B, nh, T, dk); v (B, nh, T, dv); decay (nh,) the rates s_h; state (B, nh, dk, dv).
"""

from __future__ import annotations

import torch

__all__ = [
    "lightning_attention",
    "naive_decay_attention",
    "recurrent_decay_attention",
    "tnl_decay_rates",
]


def tnl_decay_rates(num_heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """The decay rates s_h of one layer (lambda_h = exp(-s_h)), TransNormerLLM section 3.1.1.

    s_h = 2^{-8h/H} * (1 - l/(L-1) + 1e-5) for heads h = 1..H (the ALiBi slopes for H a power of
    two, computed directly for any H) and layer l = 0..L-1: the first layer decays fastest, the
    last almost not at all (factor 1e-5). A one-layer model (L = 1) has no l/(L-1); its single
    layer is treated as the first layer (factor 1 + 1e-5) rather than dividing by zero.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, received {num_heads}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers}), received {layer_idx}")
    layer_factor = 1.0 + 1e-5 if num_layers == 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return [2.0 ** (-8.0 * h / num_heads) * layer_factor for h in range(1, num_heads + 1)]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "expected q, k of shape (B, nh, T, dk) and v of shape (B, nh, T, dv), received "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if decay.shape != (q.shape[1],):
        raise ValueError(
            f"expected decay of shape (nh,) = ({q.shape[1]},), received {tuple(decay.shape)}"
        )


def _in_float32(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in float32 when they are half or bfloat16: a decay exp(-s) just below 1 rounds
    to 1 in bfloat16 (steps of 1/256 there), positions above 256 are not exact in it, and a state
    summed over thousands of tokens loses what it holds; the caller casts the output back."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.float(), k.float(), v.float()
    return q, k, v


def _initial_state(
    q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None
) -> torch.Tensor:
    B, nh, _, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        return q.new_zeros(B, nh, dk, dv)
    if initial_state.shape != (B, nh, dk, dv):
        raise ValueError(
            f"expected initial_state of shape (B, nh, dk, dv) = {(B, nh, dk, dv)}, received "
            f"{tuple(initial_state.shape)}"
        )
    return initial_state.to(q.dtype)


def _decay_matrix(decay: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(nh, R, C): exp(-s (r - c)) where r >= c, else 0."""
    diff = rows[:, None] - cols[None, :]
    decays = torch.exp(-decay[:, None, None] * diff.clamp(min=0))
    return torch.where(diff >= 0, decays, torch.zeros((), dtype=decays.dtype))


def naive_decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: o = ((Q K^T) * D) V + lambda^{t+1} Q S0 with an explicit (T, T) decay matrix.

    q, k (B, nh, T, dk); v (B, nh, T, dv); decay (nh,) -> o (B, nh, T, dv).
    """
    _check(q, k, v, decay)
    dtype = q.dtype
    q, k, v = _in_float32(q, k, v)
    idx = torch.arange(q.shape[2], device=q.device, dtype=q.dtype)
    s = decay.to(q.dtype)
    D = _decay_matrix(s, idx, idx)  # (nh, T, T)
    out = ((q @ k.transpose(-1, -2)) * D) @ v
    if initial_state is not None:
        state = _initial_state(q, v, initial_state)
        q_decay = torch.exp(-s[:, None] * (idx + 1))  # (nh, T)
        out = out + (q * q_decay[..., None]) @ state
    return out.to(dtype)


def recurrent_decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: S = lambda S + k^T v, o = q S.

    q, k (B, nh, T, dk); v (B, nh, T, dv); decay (nh,) -> (o (B, nh, T, dv), S (B, nh, dk, dv)).
    """
    _check(q, k, v, decay)
    dtype = q.dtype
    q, k, v = _in_float32(q, k, v)
    state = _initial_state(q, v, initial_state)
    lam = torch.exp(-decay.to(q.dtype))[:, None, None]  # (nh, 1, 1)
    outs = []
    for t in range(q.shape[2]):
        state = lam * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state).squeeze(-2))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return out.to(dtype), state  # the state stays float32 for half inputs


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    block_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise decayed linear attention (Lightning Attention-2, forward pass in plain torch).

    q, k (B, nh, T, dk); v (B, nh, T, dv); decay (nh,); initial_state (B, nh, dk, dv) or None.
    Returns (o (B, nh, T, dv), final state (B, nh, dk, dv)). T need not be a multiple of
    block_size; the last block is shorter. Backward is plain autograd through the block loop.
    """
    _check(q, k, v, decay)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, received {block_size}")
    dtype = q.dtype
    q, k, v = _in_float32(q, k, v)
    state = _initial_state(q, v, initial_state)
    s = decay.to(q.dtype)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def block_decays(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if b not in cache:
            idx = torch.arange(b, device=q.device, dtype=q.dtype)
            intra = _decay_matrix(s, idx, idx)  # (nh, b, b): lambda^{i-j}, j <= i
            q_decay = torch.exp(-s[:, None] * (idx + 1))[..., None]  # (nh, b, 1): lambda^{i+1}
            k_decay = torch.exp(-s[:, None] * (b - 1 - idx))[..., None]  # (nh, b, 1)
            block = torch.exp(-s * b)[:, None, None]  # (nh, 1, 1): lambda^b
            cache[b] = (intra, q_decay, k_decay, block)
        return cache[b]

    outs = []
    # split, not slicing in the loop: the backward of a slice writes into a zero tensor of the
    # full length, which would make the backward O(T^2 / b).
    blocks = zip(*(t.split(block_size, dim=2) for t in (q, k, v)), strict=True)
    for qb, kb, vb in blocks:
        intra, q_decay, k_decay, block = block_decays(qb.shape[2])
        o_intra = ((qb @ kb.transpose(-1, -2)) * intra) @ vb
        o_inter = q_decay * (qb @ state)  # decay after the matmul: autograd keeps no copy of q
        outs.append(o_intra + o_inter)
        state = block * state + (kb * k_decay).transpose(-1, -2) @ vb
    out = torch.cat(outs, dim=2) if outs else v.new_zeros(v.shape)
    return out.to(dtype), state  # the state stays float32 for half inputs
