"""TNLConfig: TransNormerLLM (lightning attention) and its softmax-attention twin.

    config = TNLConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = TNLConfig(..., attention_type="softmax")          # same model, SDPA attention
    config = TNLConfig(..., moe=MoEConfig(num_experts=4, top_k=2).to_dict())

A Hugging Face config (model_type "polychrome_tnl"); `import lm.tnl` registers it with AutoConfig.
The MoE settings are one nested object (lm.moe.MoEConfig as a dict) so this config stays short.
"""

from __future__ import annotations

from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from lm.moe import MoEConfig

__all__ = ["TNLConfig"]


@strict
class TNLConfig(PreTrainedConfig):
    r"""
    vocab_size: tokens in the vocabulary.
    hidden_size: model width C.
    intermediate_size: hidden width of the SGLU feed-forward W3(W1 x * W2 x).
    num_hidden_layers: decoder layers L.
    num_attention_heads: heads nh; head size C / nh.
    attention_type: "lightning" (gated linear attention with decay, TNL) or "softmax" (SDPA with
        RoPE and a KV cache, the comparison baseline; same norms, FFN and sizes).
    block_size: block length of the blocked lightning attention (training and prefill).
    lrpe: layers with LRPE (linearized relative positional encoding): "first" (TNL's released
        models: LRPE with decay in layer 0, decay alone above), "all" or "none".
    lrpe_learnable: LRPE angles theta are trained (TNL) or fixed at their initial values.
    gate_act: activation of the output gate u in SRMSNorm(attention) * u: "identity" (default
        since session 23: U = X W_u, the TNL paper's equation and OpenNLPLab's code), "sigmoid"
        (a bounded gate, the default before; every saved config names its gate, so models saved
        then load as they were) or "silu" (the Swish of TransNormer).
    rope_base: RoPE base of the softmax variant.
    rms_norm_eps: epsilon of SimpleRMSNorm.
    initializer_range: std of the normal init of linear and embedding weights.
    moe: None for the dense SGLU FFN, or lm.moe.MoEConfig fields as a dict.
    """

    model_type = "polychrome_tnl"

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    attention_type: Literal["lightning", "softmax"] = "lightning"
    block_size: int = 64
    lrpe: Literal["first", "all", "none"] = "first"
    lrpe_learnable: bool = True
    gate_act: Literal["sigmoid", "silu", "identity"] = "identity"
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    moe: dict[str, Any] | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        for name, valid in (
            ("attention_type", ("lightning", "softmax")),
            ("lrpe", ("first", "all", "none")),
            ("gate_act", ("sigmoid", "silu", "identity")),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"{name} must be one of {list(valid)}, received {getattr(self, name)!r}"
                )
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.attention_type == "softmax" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, received {self.head_dim}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, received {self.block_size}")
        if self.moe is not None:
            self.moe = self.moe_config.to_dict()  # type: ignore[union-attr]  # validated, filled
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_config(self) -> MoEConfig | None:
        """The MoE settings as a validated MoEConfig (None: dense FFN everywhere)."""
        if self.moe is None:
            return None
        return MoEConfig.from_dict(self.moe, source="TNLConfig.moe")
