"""TransNormerLLM (TNL) as a Hugging Face causal LM, plus its softmax-attention twin.

Read top to bottom: norms and FFN, LRPE, the two token mixers, the cache, the decoder layer, the
model and the LM head. Paper: Qin et al., "TransNormerLLM" (arXiv 2307.14995) and
"Lightning Attention-2" (arXiv 2401.04658); REFERENCE.md "Language side".

    import lm.tnl                                   # registers with the Auto classes
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(lm.tnl.TNLConfig(vocab_size=99, hidden_size=32,
                                             num_hidden_layers=2, num_attention_heads=4))
    out = model.generate(input_ids, max_new_tokens=20)   # state cache: O(1) memory per token

Layer l (pre-norm, residual):
    x = x + GLA(SRMSNorm(x));  x = x + SGLU(SRMSNorm(x))   (or MoE in place of SGLU)
GLA (gated linear attention): q, k = SiLU(W_q x), SiLU(W_k x); v = W_v x; u = gate(W_u x);
    LRPE on q, k (layer 0 by default); o = decayed linear attention (lightning_attention.py);
    out = W_o (SRMSNorm(o) * u).
Decode: the cache holds per layer the (B, nh, dk, hd) state sum_j lambda^{t-j} k_j^T v_j, so a
new token costs the same at any context length; the softmax variant's cache grows with context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer
from transformers.utils import ModelOutput

from lm.moe import MoEFeedForward, MoEOutput, build_moe
from lm.tnl.configuration_tnl import TNLConfig
from lm.tnl.lightning_attention import (
    lightning_attention,
    recurrent_decay_attention,
    tnl_decay_rates,
)

__all__ = [
    "SGLU",
    "GatedLinearAttention",
    "Lrpe",
    "SimpleRMSNorm",
    "SoftmaxAttention",
    "TNLCache",
    "TNLCausalLMOutput",
    "TNLDecoderLayer",
    "TNLForCausalLM",
    "TNLModel",
    "TNLModelOutput",
    "TNLPreTrainedModel",
]


class SimpleRMSNorm(nn.Module):
    """SRMSNorm(x) = x / RMS(x): RMSNorm without the learned gain (TNL section 3.2.2)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C); statistics in fp32."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)


class SGLU(nn.Module):
    """Simple GLU (TNL section 3.2.1): W3(W1 x * W2 x), no activation."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        return self.w3(self.w1(x) * self.w2(x))


class Lrpe(nn.Module):
    """Linearized relative positional encoding, the cosine member of the LRPE family.

    x -> [x cos(theta t), x sin(theta t)] on the last dim (doubling it), so for a query at t and
    a key at s: q' . k' = sum_i q_i k_i cos(theta_i (t - s)), a function of t - s only. Angles
    theta (nh, 1, hd) start at base^(-2 i / (nh hd)) over the nh * hd channels (TNL's init) and are
    trained when `learnable`, otherwise fixed at that init.
    """

    def __init__(
        self, num_heads: int, head_dim: int, learnable: bool = True, base: float = 10000.0
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.base = base
        self.theta = nn.Parameter(self.initial_theta()) if learnable else None

    def initial_theta(self, device: torch.device | None = None) -> torch.Tensor:
        """(nh, 1, hd) fp32."""
        d = self.num_heads * self.head_dim
        exponent = -2.0 / d * torch.arange(d, dtype=torch.float32, device=device)
        return (self.base**exponent).reshape(self.num_heads, 1, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, nh, T, hd), positions (B, T) -> (B, nh, T, 2 hd)."""
        theta = self.theta if self.theta is not None else self.initial_theta(x.device)
        angle = theta.float()[None] * positions[:, None, :, None].float()  # (B, nh, T, hd)
        return torch.cat([x * angle.cos().to(x.dtype), x * angle.sin().to(x.dtype)], dim=-1)


_GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "identity": lambda u: u,
}


class GatedLinearAttention(nn.Module):
    """TNL token mixer: SiLU-kernel linear attention with per-head exponential decay, output
    SRMSNorm and gate (TNL section 3.2.1, eq. GLA)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        decay_rates: list[float],
        lrpe: Lrpe | None,
        gate_act: str = "identity",
        block_size: int = 64,
        eps: float = 1e-6,
        layer_idx: int = 0,
    ):
        super().__init__()
        if len(decay_rates) != num_heads:
            raise ValueError(f"expected {num_heads} decay rates, received {len(decay_rates)}")
        if gate_act not in _GATES:
            raise ValueError(f"gate_act must be one of {sorted(_GATES)}, received {gate_act!r}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkvu_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = SimpleRMSNorm(eps)
        self.lrpe = lrpe
        self.gate_act = gate_act
        self.block_size = block_size
        self.layer_idx = layer_idx
        # Plain floats, not a buffer: fixed by (head, layer), never saved, and they survive the
        # meta-device construction that from_pretrained uses.
        self.decay_rates = tuple(decay_rates)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: TNLCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); positions (B, T); attention_mask (B, S >= T) 1 = token, 0 = padding, its
        last T columns are this call's tokens -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = F.silu(q), F.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)
        if attention_mask is not None:
            # A padded token adds k^T v = 0 to the state: left padding changes nothing.
            v = v * attention_mask[:, None, -T:, None].to(v.dtype)
        decay = torch.tensor(self.decay_rates, dtype=torch.float32, device=x.device)
        state = cache.get_state(self.layer_idx) if cache is not None else None
        if T == 1:
            o, state = recurrent_decay_attention(q, k, v, decay, initial_state=state)
        else:
            o, state = lightning_attention(q, k, v, decay, self.block_size, initial_state=state)
        if cache is not None:
            cache.set_state(self.layer_idx, state)
        o = o.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(self.norm(o) * _GATES[self.gate_act](u))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding (half-split layout). x (B, nh, T, hd), positions (B, T) -> same shape."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angle = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, hd / 2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SoftmaxAttention(nn.Module):
    """The comparison token mixer: multi-head softmax attention (SDPA) with RoPE and a KV cache."""

    def __init__(self, hidden_size: int, num_heads: int, rope_base: float, layer_idx: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.rope_base = rope_base
        self.layer_idx = layer_idx

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: TNLCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); positions (B, T); attention_mask (B, S) over cached + new keys."""
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hd)
        S = k.shape[2]
        past = S - T
        mask = None
        if attention_mask is not None or (past > 0 and T > 1):
            i = torch.arange(T, device=x.device)[:, None] + past
            j = torch.arange(S, device=x.device)[None, :]
            mask = (j <= i)[None, None]  # (1, 1, T, S)
            if attention_mask is not None:
                # Keep the diagonal so a padding query never has an empty row (NaN).
                mask = mask & (attention_mask[:, None, None, :].bool() | (j == i)[None, None])
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and past == 0 and T > 1
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, C))


class _StateLayer(LinearAttentionLayer):
    """A linear-attention cache layer holding only the recurrent state (no conv state)."""

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        state = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        self.has_previous_state[state_idx] = True  # the base class sets it with the conv state
        return state


class TNLCache(Cache):
    """Decoding cache of a TNL model; `generate` creates and threads it.

    Lightning layers keep a fixed-size state (B, nh, dk, hd) per layer, dk = 2 hd with LRPE; the
    softmax variant keeps growing (B, nh, S, hd) keys and values (transformers' DynamicLayer).
    `seen_tokens` counts the positions processed so far, the offset of the next positions.
    """

    def __init__(self, config: TNLConfig):
        layers: list[Any] = [
            _StateLayer() if config.attention_type == "lightning" else DynamicLayer()
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """The (B, nh, dk, hd) state of lightning layer `layer_idx`, None before the first token."""
        return self.get_recurrent_state(layer_idx)

    def set_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.update_recurrent_state(state, layer_idx)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (to measure its size)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                out += [s for s in layer.recurrent_states.values() if s is not None]
            elif isinstance(layer, DynamicLayer) and layer.keys is not None:
                assert layer.values is not None
                out += [layer.keys, layer.values]
        return out


class TNLDecoderLayer(nn.Module):
    """x = x + mixer(SRMSNorm(x)); x = x + FFN(SRMSNorm(x)), the FFN being SGLU or MoE."""

    def __init__(
        self,
        token_mixer: GatedLinearAttention | SoftmaxAttention,
        channel_mixer: SGLU | MoEFeedForward,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.token_norm = SimpleRMSNorm(eps)
        self.token_mixer = token_mixer
        self.channel_norm = SimpleRMSNorm(eps)
        self.channel_mixer = channel_mixer

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: TNLCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        """x (B, T, C) -> (x (B, T, C), the MoE output of this layer or None)."""
        x = x + self.token_mixer(self.token_norm(x), positions, cache, attention_mask)
        h = self.channel_norm(x)
        if isinstance(self.channel_mixer, MoEFeedForward):
            token_mask = None if attention_mask is None else attention_mask[:, -x.shape[1] :]
            moe = self.channel_mixer(h, token_mask)
            return x + moe.hidden_states, moe
        return x + self.channel_mixer(h), None


@dataclass
class TNLModelOutput(ModelOutput):
    """last_hidden_state (B, T, C); cache; hidden_states (L + 1) x (B, T, C) when asked;
    aux_loss / router_z_loss () means over MoE layers (None without MoE); expert_load one (E,)
    count per MoE layer (routing slots, all k choices)."""

    last_hidden_state: torch.Tensor | None = None
    cache: TNLCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    expert_load: tuple[torch.Tensor, ...] | None = None


@dataclass
class TNLCausalLMOutput(ModelOutput):
    """loss = lm_loss + aux_loss_coef * aux_loss + z_loss_coef * router_z_loss (given labels);
    logits (B, T, V); the rest as in TNLModelOutput."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: TNLCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    expert_load: tuple[torch.Tensor, ...] | None = None


class TNLPreTrainedModel(PreTrainedModel):
    config: TNLConfig
    config_class = TNLConfig
    base_model_prefix = "model"
    _no_split_modules = ["TNLDecoderLayer"]  # noqa: RUF012  (HF class attribute)
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Lrpe) and module.theta is not None:
            init.copy_(module.theta, module.initial_theta(module.theta.device))


def _build_layer(config: TNLConfig, layer_idx: int) -> TNLDecoderLayer:
    """Builder: the config's numbers turned into the parts of layer `layer_idx`."""
    mixer: GatedLinearAttention | SoftmaxAttention
    if config.attention_type == "lightning":
        use_lrpe = config.lrpe == "all" or (config.lrpe == "first" and layer_idx == 0)
        lrpe = (
            Lrpe(config.num_attention_heads, config.head_dim, config.lrpe_learnable)
            if use_lrpe
            else None
        )
        mixer = GatedLinearAttention(
            config.hidden_size,
            config.num_attention_heads,
            tnl_decay_rates(config.num_attention_heads, layer_idx, config.num_hidden_layers),
            lrpe,
            config.gate_act,
            config.block_size,
            config.rms_norm_eps,
            layer_idx,
        )
    else:
        mixer = SoftmaxAttention(
            config.hidden_size, config.num_attention_heads, config.rope_base, layer_idx
        )
    ffn: SGLU | MoEFeedForward
    moe = config.moe_config
    if moe is not None and moe.is_moe_layer(layer_idx):
        ffn = build_moe(
            moe,
            config.hidden_size,
            lambda width: SGLU(config.hidden_size, width),
            config.intermediate_size,
        )
    else:
        ffn = SGLU(config.hidden_size, config.intermediate_size)
    return TNLDecoderLayer(mixer, ffn, config.rms_norm_eps)


class TNLModel(TNLPreTrainedModel):
    """Embeddings, L decoder layers, final SRMSNorm."""

    def __init__(self, config: TNLConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            _build_layer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = SimpleRMSNorm(config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value  # type: ignore[assignment]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: TNLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> TNLModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, S) with S = cached +
        T (1 = token, 0 = padding); position_ids (B, T), default: cached + arange(T); cache a
        TNLCache (made here when use_cache and None). Other keyword arguments from generate
        (return_dict, output_attentions ...) are accepted and ignored."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None and not isinstance(cache, TNLCache):
            raise ValueError(
                f"TNL models decode with a TNLCache (recurrent state), received {type(cache)}"
            )
        if cache is None and use_cache:
            cache = TNLCache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"expected attention_mask of shape (B, cached + T) = {(B, past + T)}, received "
                f"{tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        elif position_ids.shape[-1] != T:
            raise ValueError(
                f"expected position_ids of shape (B, T) = {(B, T)}, received "
                f"{tuple(position_ids.shape)}"
            )
        hidden: list[torch.Tensor] = [x]
        moe_outputs: list[MoEOutput] = []
        for layer in self.layers:
            x, moe = layer(x, position_ids, cache, attention_mask)
            if moe is not None:
                moe_outputs.append(moe)
            hidden.append(x)
        if cache is not None:
            cache.seen_tokens += T
        x = self.norm(x)
        want_hidden = (
            output_hidden_states
            if output_hidden_states is not None
            else self.config.output_hidden_states
        )
        return TNLModelOutput(
            last_hidden_state=x,
            cache=cache,
            hidden_states=(*hidden[:-1], x) if want_hidden else None,
            aux_loss=torch.stack([m.aux_loss for m in moe_outputs]).mean() if moe_outputs else None,
            router_z_loss=torch.stack([m.z_loss for m in moe_outputs]).mean()
            if moe_outputs
            else None,
            expert_load=tuple(m.expert_load for m in moe_outputs) if moe_outputs else None,
        )


class TNLForCausalLM(TNLPreTrainedModel, GenerationMixin):
    """TNLModel plus a (tied by default) LM head; `generate` decodes with TNLCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: TNLConfig):
        super().__init__(config)
        self.model = TNLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not make a DynamicCache: forward makes the TNLCache on the first call.
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: TNLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> TNLCausalLMOutput:
        """As TNLModel.forward; labels (B, T) next-token targets in input positions (shifted
        here, -100 ignored); logits_to_keep > 0 computes logits for the last positions only."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
            loss = lm_loss
            moe = self.config.moe_config
            if moe is not None and out.aux_loss is not None and out.router_z_loss is not None:
                loss = loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.router_z_loss
        return TNLCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            router_z_loss=out.router_z_loss,
            expert_load=out.expert_load,
        )
