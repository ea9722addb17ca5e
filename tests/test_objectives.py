"""NTP and MEAP collators on hand-checked examples, and their losses on a tiny TNL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lm.tnl
from lm.objectives import (
    IGNORE_INDEX,
    MEAPCollator,
    MEAPSFTCollator,
    NTPCollator,
    ensure_mask_token,
    meap_mask_positions,
    meap_sft_examples,
)

PAD, BOS, EOS, MASK = 0, 1, 2, 3


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def word_tokenizer(with_mask: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: <pad>=0 <s>=1 </s>=2 [MASK]=3, then a..z = 4..29."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "[MASK]": MASK}
    vocab |= {chr(ord("a") + i): 4 + i for i in range(26)}
    if not with_mask:
        vocab = {k: (v if v < MASK else v - 1) for k, v in vocab.items() if k != "[MASK]"}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="[MASK]" if with_mask else None,
    )
    return tok


def tiny_tnl(vocab_size: int = 30) -> lm.tnl.TNLForCausalLM:
    torch.manual_seed(0)
    config = lm.tnl.TNLConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return lm.tnl.TNLForCausalLM(config).eval()


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Naive reference: mean CE of logits[t] against targets[t + 1] where keep[t + 1]."""
    losses = []
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1] - 1):
            if keep[b, t + 1]:
                losses.append(F.cross_entropy(logits[b, t], targets[b, t + 1]))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------
# NTP


def test_ntp_labels_are_inputs_with_padding_ignored():
    batch = NTPCollator(pad_token_id=PAD)([[5, 6, 7], [8, 9]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE_INDEX]]


def test_ntp_padding_is_found_by_position_not_id():
    # a tokenizer whose pad token is its EOS token keeps the real EOS target
    batch = NTPCollator(pad_token_id=EOS)([[5, EOS, 6], [7]])
    assert batch["labels"].tolist() == [[5, EOS, 6], [7, IGNORE_INDEX, IGNORE_INDEX]]


def test_ntp_loss_is_the_models_shifted_next_token_loss():
    model = tiny_tnl()
    batch = NTPCollator(pad_token_id=PAD)([[5, 6, 7, 8, 9], [10, 11, 12]])
    out = model(**batch)
    ref = next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"].bool())
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# MEAP pretraining


def test_meap_masks_hand_example_positions_for_a_fixed_seed():
    collator = MEAPCollator(mask_token_id=MASK, pad_token_id=PAD, protected_ids=[BOS])
    row0 = [BOS, *range(10, 30)]  # BOS + 20 tokens: floor(0.15 x 20) = 3 masks
    row1 = [BOS, 10, 11, 12]  # 3 eligible: floor(0.45) = 0 -> at least 1 mask
    batch = collator([row0, row1], generator=torch.Generator().manual_seed(0))
    # torch.randperm(20, seed 0) starts 4, 5, 13 -> eligible positions 1..20 give 5, 6, 14;
    # torch.randperm(3, seed 0) after that draw picks eligible position 1 of row 1.
    assert batch.masked[0].nonzero().flatten().tolist() == [5, 6, 14]
    assert batch.masked[1].nonzero().flatten().tolist() == [1]
    expected0 = list(row0)
    for p in (5, 6, 14):
        expected0[p] = MASK
    assert batch.input_ids[0].tolist() == expected0
    assert batch.input_ids[1].tolist()[:4] == [BOS, MASK, 11, 12]
    # labels are the ORIGINAL tokens (plain next-token targets), padding ignored
    assert batch.labels[0].tolist() == row0
    assert batch.labels[1].tolist() == [BOS, 10, 11, 12] + [IGNORE_INDEX] * 17
    ref = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:3]
    assert sorted((ref + 1).tolist()) == [5, 6, 14]


@pytest.mark.parametrize("eligible", [1, 6, 7, 20, 100, 333])
def test_meap_masks_exactly_the_expected_fraction(eligible):
    row = [BOS, *[4 + i % 20 for i in range(eligible)]]
    batch = MEAPCollator(MASK, PAD, 0.15, protected_ids=[BOS])([row])
    assert int(batch.masked.sum()) == max(1, int(0.15 * eligible))


def test_meap_never_masks_pad_or_bos_and_keeps_labels():
    collator = MEAPCollator(MASK, PAD, mask_ratio=0.5, protected_ids=[BOS])
    rows = [[BOS, 4, 5, BOS, 6, 7, 8], [BOS, 9], [BOS, 10, 11, 12, 13]]
    clean = NTPCollator(PAD)(rows)
    for seed in range(50):
        batch = collator(rows, generator=torch.Generator().manual_seed(seed))
        assert not batch.masked[clean["input_ids"] == BOS].any()
        assert not batch.masked[clean["attention_mask"] == 0].any()
        assert torch.equal(batch.labels, clean["labels"])
        assert torch.equal(batch.input_ids[~batch.masked], clean["input_ids"][~batch.masked])
        assert (batch.input_ids[batch.masked] == MASK).all()


def test_meap_may_mask_an_eos_that_is_also_the_pad_id():
    """Padding is found by position: with pad == EOS (SmolLM2 and most tokenizers this project
    loads) the separators between packed documents are as eligible as any token, as in the
    reference's uniform draw; the padding itself never is."""
    EOS = PAD
    rows = [[BOS, 4, 5, EOS, 6, 7, EOS, 8, 9], [BOS, 10, EOS]]
    collator = MEAPCollator(MASK, PAD, mask_ratio=0.5, protected_ids=[BOS])
    hits = torch.zeros(2, 9)
    for seed in range(200):
        batch = collator(rows, generator=torch.Generator().manual_seed(seed))
        assert not batch.masked[1, 3:].any()  # row 1's padding
        assert not batch.masked[:, 0].any()  # BOS
        hits += batch.masked.float()
    rate = hits / 200
    # row 0: 8 eligible, 4 masked -> every non-BOS position, EOS included, at 1/2
    torch.testing.assert_close(rate[0, 1:], torch.full((8,), 0.5), atol=0.1, rtol=0)
    # row 1: 2 eligible, 1 masked -> its EOS half the time
    assert 0.35 < float(rate[1, 2]) < 0.65


def test_meap_from_tokenizer_protects_bos_unless_it_is_the_eos():
    class Tok:
        mask_token_id, pad_token_id = MASK, PAD

        def __init__(self, bos, eos):
            self.bos_token_id, self.eos_token_id = bos, eos

    assert MEAPCollator.from_tokenizer(Tok(BOS, PAD)).protected_ids == [BOS]
    assert MEAPCollator.from_tokenizer(Tok(BOS, BOS)).protected_ids == []


def test_meap_mask_positions_nothing_eligible():
    assert meap_mask_positions(torch.zeros(5, dtype=torch.bool), 0.15).numel() == 0


def test_meap_loss_is_next_token_on_the_original_tokens():
    model = tiny_tnl()
    rows = [[BOS, *range(4, 24)], [BOS, *range(24, 30), 4, 5]]
    batch = MEAPCollator(MASK, PAD, protected_ids=[BOS])(rows, torch.Generator().manual_seed(1))
    out = model(**batch.model_inputs())
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    original = NTPCollator(PAD)(rows)
    ref = next_token_loss(logits, original["input_ids"], original["attention_mask"].bool())
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert batch.masked.any()


def test_ensure_mask_token_adds_token_and_resizes_embeddings():
    tok = word_tokenizer(with_mask=False)
    assert tok.mask_token_id is None
    n = len(tok)
    model = tiny_tnl(vocab_size=n)
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id = ensure_mask_token(tok, model)
    assert mask_id == n and len(tok) == n + 1 and tok.mask_token == "[MASK]"
    after = model.get_input_embeddings().weight
    assert after.shape == (n + 1, 16)
    torch.testing.assert_close(after[:n], before)  # old rows unchanged
    assert model.lm_head.weight.shape == (n + 1, 16)  # the tied head grows with it
    assert ensure_mask_token(tok, model) == mask_id  # a second call changes nothing
    assert model.get_input_embeddings().weight.shape == (n + 1, 16)


# ----------------------------------------------------------------------------------------------
# MEAP SFT


def test_meap_sft_hand_example():
    prompt, answer = [BOS, 10, 11], [20, 21, 22, 23, 24, 25]
    clean, masked = meap_sft_examples(
        prompt,
        answer,
        EOS,
        MASK,
        mask_ratio=0.5,
        min_answer_tokens=5,
        generator=torch.Generator().manual_seed(0),
    )
    # clean: ordinary SFT, loss on the answer and EOS
    assert clean.input_ids == [BOS, 10, 11, 20, 21, 22, 23, 24, 25, EOS]
    assert clean.labels == [-100, -100, -100, 20, 21, 22, 23, 24, 25, EOS]
    # copy: int(6 x 0.5) = 3 answer positions; torch.randperm(6, seed 0) = 2, 5, 3, ... ->
    # answer offsets 2, 5, 3 -> sequence positions 5, 8, 6
    assert masked is not None
    assert masked.input_ids == [BOS, 10, 11, 20, 21, MASK, MASK, 24, MASK, EOS]
    assert masked.labels == [-100, -100, -100, -100, -100, 22, 23, -100, 25, -100]


def test_meap_sft_copy_only_for_long_answers_and_within_max_length():
    clean, masked = meap_sft_examples([BOS, 10], [20, 21, 22], EOS, MASK, min_answer_tokens=3)
    assert masked is None and clean.labels[-1] == EOS
    prompt, answer = [BOS, *range(4, 10)], list(range(10, 90))
    for seed in range(10):
        clean, masked = meap_sft_examples(
            prompt,
            answer,
            EOS,
            MASK,
            0.1,
            max_length=40,
            generator=torch.Generator().manual_seed(seed),
        )
        assert masked is not None
        assert len(clean.input_ids) == len(clean.labels) == 40 and clean.input_ids[-1] == EOS
        assert len(masked.input_ids) == len(masked.labels) == 40 and masked.input_ids[-1] == EOS
        where = [i for i, x in enumerate(masked.input_ids) if x == MASK]
        assert len(where) == max(1, int(0.1 * (39 - len(prompt))))  # answer part cut to 39 - 7
        assert all(len(prompt) <= i < 39 for i in where)  # never the prompt, never EOS
        assert [masked.labels[i] for i in where] == [(prompt + answer)[i] for i in where]
        assert sum(lab != -100 for lab in masked.labels) == len(where)


def test_meap_sft_collator_appends_copies_after_clean_rows():
    tok = word_tokenizer()
    collator = MEAPSFTCollator(tok, mask_ratio=0.5, min_answer_tokens=3)
    pairs = [("a b", "c d e f"), {"prompt": "g", "answer": "h i"}]
    batch = collator(pairs, generator=torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    a, b, c, d, e, f, g, h, i = (tok.convert_tokens_to_ids(x) for x in "abcdefghi")
    # rows: clean pair 0, clean pair 1, masked copy of pair 0 (pair 1's answer is too short)
    assert len(ids) == 3
    assert ids[0] == [a, b, c, d, e, f, EOS]
    assert labels[0] == [-100, -100, c, d, e, f, EOS]
    assert ids[1] == [g, h, i, EOS, PAD, PAD, PAD]
    assert labels[1] == [-100, h, i, EOS, -100, -100, -100]
    masked_at = [k for k, x in enumerate(ids[2]) if x == MASK]
    assert len(masked_at) == 2 and all(2 <= k <= 5 for k in masked_at)
    assert [labels[2][k] for k in masked_at] == [[a, b, c, d, e, f][k] for k in masked_at]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0, 0]
