"""TransNormerLLM (lightning attention) as a Hugging Face model.

Importing this package registers TNLConfig (model_type "polychrome_tnl") with AutoConfig and
TNLModel / TNLForCausalLM with AutoModel / AutoModelForCausalLM. `import lm.tnl` must therefore run
before any Auto* call on a TNL config or checkpoint; there is no trust_remote_code path:

    import lm.tnl  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/tnl_checkpoint")
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lm.tnl.configuration_tnl import TNLConfig
from lm.tnl.lightning_attention import (
    lightning_attention,
    naive_decay_attention,
    recurrent_decay_attention,
    tnl_decay_rates,
)
from lm.tnl.modeling_tnl import (
    TNLCache,
    TNLCausalLMOutput,
    TNLForCausalLM,
    TNLModel,
    TNLModelOutput,
)

__all__ = [
    "TNLCache",
    "TNLCausalLMOutput",
    "TNLConfig",
    "TNLForCausalLM",
    "TNLModel",
    "TNLModelOutput",
    "lightning_attention",
    "naive_decay_attention",
    "recurrent_decay_attention",
    "tnl_decay_rates",
]

# exist_ok: re-importing (importlib.reload, test runners) must not fail.
AutoConfig.register(TNLConfig.model_type, TNLConfig, exist_ok=True)
AutoModel.register(TNLConfig, TNLModel, exist_ok=True)
AutoModelForCausalLM.register(TNLConfig, TNLForCausalLM, exist_ok=True)
