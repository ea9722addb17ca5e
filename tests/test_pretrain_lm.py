"""train.pretrain_lm smoke runs (ntp / meap on TNL, ernie-gram on BERT) and lm.corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import lm.tnl  # noqa: F401  (registers TNL with the Auto classes)
from lm.corpus import (
    Corpus,
    pack_documents,
    pydoc_corpus,
    text_files_corpus,
    tokenize_documents,
    train_bpe_tokenizer,
)
from train.pretrain_lm import main, shapeworld_corpus

# A small pydoc slice, a ~300-token BPE, a 2-layer model: each run takes about a second.
TINY = [
    "--hidden", "32", "--layers", "2", "--heads", "4", "--tokenizer", "bpe:300",
    "--corpus", "pydoc", "--max-chars", "20000", "--seq-len", "32", "--batch-size", "8",
    "--lr", "3e-3", "--eval-every", "6", "--eval-batches", "2",
]  # fmt: skip


# Tiny models on a shared 2-core machine: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(out: Path) -> dict:
    return json.loads((out / "log.json").read_text(encoding="utf-8"))


def assert_loss_decreased(log: dict, key: str = "loss") -> None:
    losses = [r[key] for r in log["train"]]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses


# ----------------------------------------------------------------------------------------------
# Corpora, tokenizer, packing


def test_pydoc_corpus_heldout_topics():
    from pydoc_data.topics import topics

    corpus = pydoc_corpus()
    held = corpus.description["heldout_topics"]
    assert held == sorted(topics)[5::10]
    assert held == [
        "attribute-access",
        "booleans",
        "customization",
        "for",
        "integers",
        "power",
        "subscriptions",
        "unary",
    ]
    assert corpus.heldout == [topics[k] for k in held]
    dropped = corpus.description["dropped_train_topics"]
    assert dropped == ["compound", "floating", "specialnames", "while"]  # they repeat held-out text
    assert len(corpus.train) + len(corpus.heldout) + len(dropped) == len(topics)
    assert not set(corpus.train) & set(corpus.heldout)
    # no run of 12 words of held-out text is trained on (checked naively, by string search)
    train_text = " " + " ".join(" ".join(d.split()) for d in corpus.train) + " "
    for doc in corpus.heldout:
        words = doc.split()
        for i in range(0, len(words) - 11, 7):
            assert " " + " ".join(words[i : i + 12]) + " " not in train_text
    small = corpus.truncated(1000)
    assert sum(map(len, small.train)) == 1000 and sum(map(len, small.heldout)) == 1000


def test_text_files_corpus_per_file_and_per_line(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"line a {i}\n\nline b {i}\n", encoding="utf-8")
    per_file = text_files_corpus(str(tmp_path / "*.txt"))
    assert len(per_file.train) == 11 and per_file.heldout == ["line a 9\n\nline b 9\n"]
    per_line = text_files_corpus(str(tmp_path / "*.txt"), per_line=True)
    assert len(per_line.train) + len(per_line.heldout) == 24
    assert per_line.heldout == ["line b 4", "line b 9"]  # line indices 9 and 19
    with pytest.raises(FileNotFoundError, match="no file matches"):
        text_files_corpus(str(tmp_path / "*.md"))


def test_drop_overlapping_hand_example():
    from lm.corpus import drop_overlapping

    held = ["the quick brown fox jumps"]
    train = ["a quick brown fox runs", "the quick brown fox", "x the quick brown fox jumps y", "z"]
    assert drop_overlapping(train, held, n=4) == [1, 2]  # share "the quick brown fox"
    assert drop_overlapping(train, held, n=5) == [2]
    assert drop_overlapping(train, held, n=3) == [0, 1, 2]
    with pytest.raises(ValueError, match="n must be"):
        drop_overlapping(train, held, n=0)


def test_drop_overlapping_parts_catches_runs_across_the_joins():
    from lm.corpus import drop_overlapping, drop_overlapping_parts

    held = ["the quick brown fox jumps"]
    parts = ["a b the quick", "brown fox", "jumps over", "c d e f", "quick brown fox jumps"]
    # Alone, only the last part holds a 4-word run of the held-out text.
    assert drop_overlapping(parts, held, n=4) == [4]
    # Joined, "the quick | brown fox | jumps" crosses two joins: all three parts go.
    assert drop_overlapping_parts(parts, held, n=4) == [0, 1, 2, 4]
    # Dropping a part makes a new join, which is checked again: without "zz brown fox jumps",
    # "x the quick" meets "brown y" and "the quick brown" is a held-out run.
    chain = ["x the quick", "zz brown fox jumps", "brown y", "z"]
    assert drop_overlapping(chain, held, n=3) == [1]
    assert drop_overlapping_parts(chain, held, n=3) == [0, 1, 2]
    assert drop_overlapping_parts(["quick brown", "zz", "fox"], held, n=3) == []
    with pytest.raises(ValueError, match="n must be"):
        drop_overlapping_parts(parts, held, n=0)


def test_pydoc_splits_of_the_embedding_scripts_share_no_12_words_with_held_out_text():
    """train.embeddings' training passages and train.dupmae's pretraining text against the
    held-out passages, by plain substring search over every held-out 12-word run."""
    from data.text_corpora import pydoc_passages
    from train.dupmae import pretraining_texts
    from train.embeddings import heldout_topics, pydoc_items

    passages = pydoc_passages()
    held = set(heldout_topics([p.topic for p in passages], 2))
    runs = set()
    for p in passages:
        if p.topic in held:
            words = f"{p.query} {p.text}".split()  # the passage and its sentence query
            runs |= {" ".join(words[i : i + 12]) for i in range(len(words) - 11)}
    texts, dropped = pretraining_texts(held)
    items, _, _ = pydoc_items(2)
    pydoc = [it for it in items if it.source == "pydoc"]
    trained = [*texts.values(), *(f"{it.queries[1]} {it.positives[0]}" for it in pydoc)]
    assert dropped > 0 and len(texts) > 20
    assert not [r for text in trained for r in runs if f" {r} " in f" {text} "]


def test_pack_documents_hand_example():
    rows = pack_documents([[1, 2], [3], [4, 5, 6]], seq_len=3, eos_token_id=9)
    # stream 1 2 9 3 9 4 5 6 9 -> three rows; nothing left over
    assert rows.tolist() == [[1, 2, 9], [3, 9, 4], [5, 6, 9]]
    assert pack_documents([[1, 2], [3]], 2, 9).tolist() == [[1, 2], [9, 3]]  # tail 9 dropped


def test_bpe_tokenizer_round_trip(tmp_path):
    texts = pydoc_corpus().truncated(5000).train
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(tok) == 300
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<pad>" and tok.mask_token == "<mask>"
    ids = tokenize_documents(tok, texts[:1])[0]
    assert tok.decode(ids) == texts[0]  # byte-level: lossless
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[0], add_special_tokens=False)["input_ids"] == ids
    assert again.mask_token_id == tok.mask_token_id


def test_shapeworld_corpus_generated_on_the_fly():
    args = argparse.Namespace(shapeworld_dir=None, shapeworld_images=10, seed=0)
    corpus = shapeworld_corpus(args)
    assert isinstance(corpus, Corpus)
    assert len(corpus.train) == 10 and len(corpus.heldout) == 1  # val scenes held out
    assert all(d.endswith(".") for d in corpus.train)
    assert corpus.train == shapeworld_corpus(args).train  # deterministic


def test_shapeworld_corpus_from_an_exported_folder(tmp_path):
    from data.render import LayoutConfig
    from data.shapeworld import ShapeWorldConfig, SplitSizes, generate, generate_scene

    sizes = SplitSizes(train=4, val=2, test=0, pretrain=3)
    cfg = ShapeWorldConfig(layout=LayoutConfig(image_size=32), splits=sizes)
    generate(tmp_path / "sw", cfg, workers=1, progress=False)
    args = argparse.Namespace(shapeworld_dir=tmp_path / "sw", shapeworld_images=0, seed=0)
    corpus = shapeworld_corpus(args)
    assert len(corpus.train) == 3 + 4 and len(corpus.heldout) == 2  # pretrain + train | val
    expected = [" ".join(generate_scene(cfg.layout, 0, "pretrain", i).captions) for i in range(3)]
    assert corpus.train[:3] == expected  # one document per image: its captions


# ----------------------------------------------------------------------------------------------
# Smoke runs


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "python -m train.pretrain_lm --objective ntp --arch tnl" in capsys.readouterr().out


def test_rejects_an_arch_that_does_not_fit_the_objective(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--objective", "ernie-gram", "--arch", "tnl", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_ntp_on_tnl_trains_and_resume_equals_uninterrupted(tmp_path):
    run = ["--objective", "ntp", "--arch", "tnl", *TINY, "--steps", "12"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*run, "--out", str(full)]) == 0
    assert main([*run, "--out", str(split), "--stop-at", "5"]) == 0
    assert not (split / "final").exists() and (split / "last").is_dir()
    with pytest.raises(SystemExit):  # another output gate is another model: refused
        main([*run, "--out", str(split), "--resume", "--gate-act", "sigmoid"])
    assert main([*run, "--out", str(split), "--resume"]) == 0

    log = read_log(full)
    assert_loss_decreased(log)
    assert [r["step"] for r in log["eval"]] == [6, 12]
    assert log["eval"][-1]["ppl"] == pytest.approx(np.exp(log["eval"][-1]["loss"]))
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    resumed = read_log(split)
    assert [r["step"] for r in resumed["train"]] == list(range(1, 13))
    np.testing.assert_allclose(
        [r["loss"] for r in resumed["train"]], [r["loss"] for r in log["train"]], atol=1e-6
    )
    for out in (full, split):
        assert (out / "loss_curve.png").stat().st_size > 1000
    final = full / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "TNLForCausalLM" and len(tokenizer) == 300
    assert "python -m train.pretrain_lm" in (final / "MODEL_CARD.md").read_text(encoding="utf-8")


def test_meap_on_tnl_trains(tmp_path):
    out = tmp_path / "meap"
    assert (
        main(["--objective", "meap", "--arch", "tnl", *TINY, "--steps", "12", "--out", str(out)])
        == 0
    )
    log = read_log(out)
    assert_loss_decreased(log)
    assert {"loss", "ppl"} <= set(log["eval"][-1])  # clean held-out next-token loss
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.mask_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_ernie_gram_on_bert_trains(tmp_path):
    out = tmp_path / "ernie"
    run = ["--objective", "ernie-gram", "--arch", "bert", *TINY, "--lexicon-size", "50"]
    assert main([*run, "--steps", "12", "--out", str(out)]) == 0
    log = read_log(out)
    assert_loss_decreased(log)
    assert {"coarse_loss", "fine_loss", "generator_loss"} <= set(log["eval"][-1])
    final = out / "final"
    encoder = AutoModel.from_pretrained(final)
    assert type(encoder).__name__ == "BertModel" and encoder.config.hidden_size == 32
    generator = AutoModel.from_pretrained(final / "generator")
    assert generator.config.hidden_size == 16 and generator.config.num_hidden_layers == 1
    heads = load_file(final / "ernie_gram_heads.safetensors")
    lexicon = json.loads((final / "ngram_lexicon.json").read_text(encoding="utf-8"))
    assert len(lexicon["ngrams"]) == 100  # 50 bigrams + 50 trigrams
    assert heads["coarse_head.decoder.weight"].shape == (300 + 100, 32)
    assert heads["fine_head.decoder.weight"].shape == (300, 32)


def test_meap_on_a_hub_style_causal_lm_adds_mask_and_resizes(tmp_path):
    out = tmp_path / "llama"
    run = ["--objective", "meap", "--model", "tiny-random-llama", "--corpus", "pydoc"]
    run += ["--max-chars", "20000", "--seq-len", "32", "--batch-size", "8", "--steps", "6"]
    assert main([*run, "--eval-every", "3", "--eval-batches", "1", "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert tokenizer.mask_token == "[MASK]"  # the tiny Llama's tokenizer had none
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert read_log(out)["config"]["vocab_size"] == len(tokenizer)
