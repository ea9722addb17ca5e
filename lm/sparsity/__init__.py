"""N:M sparsity for any Hugging Face causal LM: one-shot baselines and MaskLLM's learnable masks.

    from lm.sparsity import NM, prune_oneshot, calibration_rows, save_sparse_checkpoint
    rows = calibration_rows(tokenizer, pydoc_corpus().train, n_seqs=32, seq_len=512)
    masks = prune_oneshot(model, "sparsegpt", NM(2, 4), rows)          # in place
    # or learn them (train/sparsify.py runs the loop): lm.sparsity.maskllm

Files, one component each:

- masks.py: N:M patterns, masks along the input dimension of (out, in) weights, check_nm,
  which layers to prune (default: every nn.Linear inside the decoder blocks).
- calibration.py: calibration / held-out rows, the sequential block-by-block loop, NLL.
- oneshot.py: magnitude, Wanda and SparseGPT.
- maskllm.py: MaskLLM's Gumbel-softmax pattern logits, MaskedLinear, prior init, export.
- checkpoint.py: sparse checkpoints (pattern indices + kept values over the dense source).
- semi_structured.py: 2:4 layers to torch.sparse semi-structured tensors on CUDA.
"""

from lm.sparsity.calibration import calibration_rows, heldout_rows, lm_nll, sequential_calibrate
from lm.sparsity.checkpoint import (
    SparseCheckpoint,
    apply_sparse_checkpoint,
    load_sparse_checkpoint,
    load_sparse_model,
    save_sparse_checkpoint,
    weights_digest,
)
from lm.sparsity.maskllm import (
    DifferentiableMask,
    MaskedLinear,
    MaskLLMConfig,
    hard_masks,
    init_from_prior,
    install_masks,
    kept_weight_norm,
    linear_schedule,
    regulariser_coef,
    remove_masks,
    set_schedule,
)
from lm.sparsity.masks import (
    NM,
    apply_mask,
    check_nm,
    decoder_blocks,
    mask_to_patterns,
    patterns_to_mask,
    prunable_linears,
    topn_mask,
)
from lm.sparsity.oneshot import (
    METHODS,
    HessianStats,
    InputNormStats,
    magnitude_mask,
    prune_oneshot,
    sparsegpt_prune,
    sparsity_report,
    wanda_mask,
    wanda_scores,
)
from lm.sparsity.semi_structured import to_semi_structured

__all__ = [
    "METHODS",
    "NM",
    "DifferentiableMask",
    "HessianStats",
    "InputNormStats",
    "MaskLLMConfig",
    "MaskedLinear",
    "SparseCheckpoint",
    "apply_mask",
    "apply_sparse_checkpoint",
    "calibration_rows",
    "check_nm",
    "decoder_blocks",
    "hard_masks",
    "heldout_rows",
    "init_from_prior",
    "install_masks",
    "kept_weight_norm",
    "linear_schedule",
    "lm_nll",
    "load_sparse_checkpoint",
    "load_sparse_model",
    "magnitude_mask",
    "mask_to_patterns",
    "patterns_to_mask",
    "prunable_linears",
    "prune_oneshot",
    "regulariser_coef",
    "remove_masks",
    "save_sparse_checkpoint",
    "sequential_calibrate",
    "set_schedule",
    "sparsegpt_prune",
    "sparsity_report",
    "to_semi_structured",
    "topn_mask",
    "wanda_mask",
    "wanda_scores",
    "weights_digest",
]
