"""Sentence and document embeddings (issue 7).

- pooling.py: embeddings from any Hugging Face causal LM or encoder (``LMEmbedder``): mean,
  last-token, position-weighted mean (SGPT) and EOS pooling, correct under left and right
  padding, and PromptEOL prompting.
- matryoshka2d.py: 2D Matryoshka Sentence Embeddings (2DMSE): the loss over the last and a
  sampled shallower layer at full and truncated dims with the KL alignment term, its 1-D
  Matryoshka and full-only baselines, and ``Matryoshka2dEncoder.encode(texts, layer=, dim=)``.
- binary_pv.py: Binary Paragraph Vector (binary codes, Hamming retrieval; ``BinaryPVEncoder``)
  and its baseline, random-projection hashing of TF-IDF (``TfidfHasher``).
- sense_skipgram.py: Disambiguated Skip-gram (K senses per word, differentiable selection).
- dupmae.py: RetroMAE v2 / DupMAE pretraining of a BERT-class encoder (enhanced decoder with
  per-row visibility, bag-of-words loss) and the MLM-only baseline.
- dse.py: a bi-encoder student distilled from a cross-encoder teacher's scores (DSE).
- defsent.py: DefSent+ entry embeddings from definitions, ICA whitening, the frozen entry
  classifier, isotropy measures.

The lexinvariant language model is ``lm.lexinvariant``.
"""

from lm.embeddings.binary_pv import (
    BinaryParagraphVector,
    BinaryPVConfig,
    BinaryPVEncoder,
    TfidfHasher,
    hamming_distances,
    load_binary_pv,
)
from lm.embeddings.defsent import DefSentPlus, EntryClassifier, Whitening
from lm.embeddings.dse import BiEncoder, CrossEncoder, distillation_kl
from lm.embeddings.dupmae import DupMAEConfig, DupMAEModel
from lm.embeddings.matryoshka2d import (
    OBJECTIVES,
    Matryoshka2dConfig,
    Matryoshka2dEncoder,
    MatryoshkaLossOutput,
    full_dim_loss,
    info_nce,
    kl_alignment,
    matryoshka_1d_loss,
    matryoshka_2d_loss,
    objective_loss,
    sample_layer_and_dim,
)
from lm.embeddings.pooling import (
    POOLINGS,
    PROMPTS,
    LMEmbedder,
    format_prompt,
    last_token_index,
    pool,
    position_weights,
)
from lm.embeddings.sense_skipgram import DisambiguatedSkipGram, SenseSkipGramConfig

__all__ = [
    "OBJECTIVES",
    "POOLINGS",
    "PROMPTS",
    "BiEncoder",
    "BinaryPVConfig",
    "BinaryPVEncoder",
    "BinaryParagraphVector",
    "CrossEncoder",
    "DefSentPlus",
    "DisambiguatedSkipGram",
    "DupMAEConfig",
    "DupMAEModel",
    "EntryClassifier",
    "LMEmbedder",
    "Matryoshka2dConfig",
    "Matryoshka2dEncoder",
    "MatryoshkaLossOutput",
    "SenseSkipGramConfig",
    "TfidfHasher",
    "Whitening",
    "distillation_kl",
    "format_prompt",
    "full_dim_loss",
    "hamming_distances",
    "info_nce",
    "kl_alignment",
    "last_token_index",
    "load_binary_pv",
    "matryoshka_1d_loss",
    "matryoshka_2d_loss",
    "objective_loss",
    "pool",
    "position_weights",
    "sample_layer_and_dim",
]
