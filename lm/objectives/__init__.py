"""Pretraining objectives and their collators, usable with any Hugging Face model and tokenizer.

- ``ntp``: next-token prediction (NTPCollator).
- ``meap``: MEAP pretraining (MEAPCollator: [MASK] on 15% of inputs, next-token targets) and MEAP
  SFT (MEAPSFTCollator: a masked copy of each long-answer example); ensure_mask_token.
- ``ernie_gram``: ERNIE-Gram for bidirectional encoders: t-test n-gram lexicon, explicit n-gram
  masking (ErnieGramCollator), ErnieGramForPretraining (coarse + fine heads, generator).
- ``mlm``: the masked-LM baselines ERNIE-Gram is compared with: BERT token masking and SpanBERT
  contiguous span masking (SpanMaskingCollator).

Collators take an optional ``torch.Generator``: a training loop that seeds it from (seed, step)
draws the same masks again when it resumes.
"""

from lm.objectives.ernie_gram import (
    ErnieGramBatch,
    ErnieGramCollator,
    ErnieGramConfig,
    ErnieGramExample,
    ErnieGramForPretraining,
    ErnieGramOutput,
    NGramLexicon,
    build_ngram_lexicon,
    ngram_t_scores,
    sample_from_logits,
)
from lm.objectives.meap import (
    MASK_TOKEN,
    MEAPBatch,
    MEAPCollator,
    MEAPSFTCollator,
    SFTExample,
    ensure_mask_token,
    meap_mask_positions,
    meap_sft_examples,
)
from lm.objectives.mlm import MLMBatch, SpanMaskingCollator, span_mask_positions
from lm.objectives.ntp import IGNORE_INDEX, NTPCollator, pad_sequences

__all__ = [
    "IGNORE_INDEX",
    "MASK_TOKEN",
    "ErnieGramBatch",
    "ErnieGramCollator",
    "ErnieGramConfig",
    "ErnieGramExample",
    "ErnieGramForPretraining",
    "ErnieGramOutput",
    "MEAPBatch",
    "MEAPCollator",
    "MEAPSFTCollator",
    "MLMBatch",
    "NGramLexicon",
    "NTPCollator",
    "SFTExample",
    "SpanMaskingCollator",
    "build_ngram_lexicon",
    "ensure_mask_token",
    "meap_mask_positions",
    "meap_sft_examples",
    "ngram_t_scores",
    "pad_sequences",
    "sample_from_logits",
    "span_mask_positions",
]
