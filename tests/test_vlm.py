"""The VLM core on the tiny preset: visual tokens, frozen-LLM invariance, labels, save/load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.checkpoint import CheckpointError, save_checkpoint
from core.config import project_path
from core.images import ImageError
from data.conversations import (
    SHORT_ANSWER,
    ChatRecord,
    caption_conversation,
    instruct_conversation,
    read_chat_records,
)
from data.formats import FormatError, read_imagefolder
from data.scene import COLOURS, SHAPES
from data.shapeworld import main as shapeworld_main
from eval.vlm import caption_scores, normalise_answer, parse_objects
from eval.vlm import main as eval_main
from train.vlm import main as train_main
from vision.clip import (
    TENSOR_FILE,
    build_clip,
    dense_features,
    get_clip_config,
    trained_state_dict,
)
from vlm.assistant import MAX_IMAGES, Assistant, SamplingSettings
from vlm.config import PolychromeConfig
from vlm.model import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ImageLoraConfig,
    PolychromeVLM,
    Projector,
    ProjectorConfig,
    VLMConfig,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm() -> PolychromeVLM:
    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(0)  # module fixtures are built before the per-test seeding
    return PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector))


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "12", "--val", "4", "--test", "4"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    return root


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_text_only_logits_are_bitwise_the_bare_llms(vlm):
    batch = vlm.prepare([{"role": "user", "content": "Name three shapes."}])
    with torch.no_grad():
        ours = vlm(**batch).logits
        bare = vlm.llm(input_ids=batch["input_ids"]).logits
    assert ours is not None and torch.equal(ours, bare)


def test_image_features_land_exactly_on_the_placeholders(vlm):
    batch = vlm.prepare([{"role": "user", "content": "What is this?", "images": [_image()]}])
    ids = batch["input_ids"]
    n = vlm.tokens_per_image
    assert int((ids == vlm.image_token_id).sum()) == n
    with torch.no_grad():
        feats = vlm.encode_images(batch["pixel_values"])  # (1, n, H)
        embeds = vlm.embed(ids, feats)
        plain = vlm.llm.get_input_embeddings()(ids.clamp(max=vlm.image_token_id - 1))
    slots = (ids == vlm.image_token_id)[0]
    assert torch.equal(embeds[0, slots], feats[0])
    assert torch.equal(embeds[0, ~slots], plain[0, ~slots])  # every text token untouched


def test_non_square_images_are_padded_to_a_square_not_cropped(vlm):
    """LLaVA-1.5's "pad": a wide image sits centred on CLIP's mean colour (which normalises to
    0), its right edge kept; a square image goes through CLIP's preprocessing unchanged."""
    size = vlm.pixel_values([_image()]).shape[-1]
    wide = np.zeros((size, 2 * size, 3), np.uint8)
    wide[:, -size // 4 :] = (255, 0, 0)  # a red band at the right edge
    px = vlm.pixel_values([Image.fromarray(wide)])[0]  # (3, S, S)
    band = size // 2  # the image fills rows S/4 .. 3S/4 of the square
    assert px[:, : size // 4 - 1].abs().max() < 0.05  # padding: CLIP's mean, ~0 once normalised
    assert px[:, size // 4 + 1 : size // 4 + band - 1, -2].argmax(0).eq(0).all()  # red kept
    square = _image(size=size)
    torch.testing.assert_close(vlm.pixel_values([square])[0], vlm.preprocess(square), rtol=0,
                               atol=0)  # fmt: skip


def test_placeholder_count_mismatch_names_both_counts(vlm):
    batch = vlm.prepare([{"role": "user", "content": "hi", "images": [_image()]}])
    feats = vlm.encode_images(batch["pixel_values"])
    n = vlm.tokens_per_image
    with pytest.raises(ValueError, match=rf"{n} {IMAGE_TOKEN} tokens.*{2 * n} features"):
        vlm.embed(batch["input_ids"], torch.cat([feats, feats]))
    with pytest.raises(ValueError, match=rf"{n} {IMAGE_TOKEN} tokens.*0 features"):
        vlm.embed(batch["input_ids"], None)


def test_projector_merges_each_block_of_patches_in_reading_order():
    proj = Projector(vision_width=3, llm_width=5, merge=2)
    tokens = torch.randn(1, 16, 3)  # a 4x4 grid
    out = proj(tokens, (4, 4))
    assert out.shape == (1, 4, 5)
    grid = tokens.reshape(4, 4, 3)
    # Token 1 is the top-right block: rows 0-1, columns 2-3, concatenated row-major.
    block = torch.cat([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]])
    expected = proj.fc2(proj.act(proj.fc1(proj.norm(block))))
    torch.testing.assert_close(out[0, 1], expected)
    with pytest.raises(ValueError, match="divisible by merge=2"):
        proj(torch.randn(1, 9, 3), (3, 3))


def test_learned_position_embeddings_add_each_tokens_row_and_column():
    torch.manual_seed(0)
    plain = Projector(vision_width=3, llm_width=5, merge=2)
    proj = Projector(vision_width=3, llm_width=5, merge=2, position_grid=(2, 2))
    proj.load_state_dict(plain.state_dict(), strict=False)  # the same MLP
    assert proj.row_embed is not None and proj.col_embed is not None
    tokens = torch.randn(1, 16, 3)  # a 4x4 patch grid -> 2x2 visual tokens
    got = proj(tokens, (4, 4)) - plain(tokens, (4, 4))
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # reading order
        torch.testing.assert_close(got[0, k], proj.row_embed[r] + proj.col_embed[c])
    with pytest.raises(ValueError, match="for a 2x2 token grid, received 3x3"):
        proj(torch.randn(1, 36, 3), (6, 6))
    with pytest.raises(ValueError, match="position must be one of"):
        ProjectorConfig(position="sincos")
    cfg = PolychromeConfig.from_preset("tiny")
    vlm_cfg = cfg.vlm.core_config(cfg.llm, cfg.clip, position="learned")
    vlm = PolychromeVLM.build(vlm_cfg)
    assert {"projector.row_embed", "projector.col_embed"} <= set(vlm.trained_state_dict())


def test_labels_cover_only_the_assistant_replies(vlm):
    conv = [
        {"role": "user", "content": "Describe it.", "images": [_image()]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Colour? " + SHORT_ANSWER},
        {"role": "assistant", "content": "red"},
    ]
    ids, labels = vlm.tokenize_chat(conv)
    supervised = vlm.tokenizer.decode(ids[labels != IGNORE_INDEX])
    end = vlm.tokenizer.eos_token
    assert supervised == f"A red circle.{end}red{end}"
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    with pytest.raises(ValueError, match="end with an assistant turn"):
        vlm.tokenize_chat(conv[:3])
    # an empty reply labels only its end-of-turn token; an image on an assistant turn (its
    # placeholders inside the reply span) is not a target, and the loss can be taken
    ids, labels = vlm.tokenize_chat([*conv[:1], {"role": "assistant", "content": ""}])
    assert vlm.tokenizer.decode(ids[labels != IGNORE_INDEX]) == end
    shown = [*conv[:1], {"role": "assistant", "content": "Here.", "images": [_image(2)]}]
    ids, labels = vlm.tokenize_chat(shown)
    assert vlm.tokenizer.decode(ids[labels != IGNORE_INDEX]) == f"\nHere.{end}"  # after the image
    assert (ids == vlm.image_token_id).sum() == 2 * vlm.tokens_per_image
    with torch.no_grad():
        assert torch.isfinite(vlm(**vlm.collate([shown])).loss)


def test_loss_equals_cross_entropy_from_the_full_logits(vlm):
    conv = [
        {"role": "user", "content": "Describe it.", "images": [_image(1)]},
        {"role": "assistant", "content": "Two shapes."},
    ]
    batch = vlm.collate([conv, [*conv[:1], {"role": "assistant", "content": "No."}]])
    with torch.no_grad():
        out = vlm(**batch)
        full = vlm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(full[:, :-1][keep], targets[keep])
    assert out.n_labels == int(keep.sum())
    torch.testing.assert_close(out.loss, expected)
    padded = vlm.collate([conv], pad_to_multiple_of=64)
    assert padded["input_ids"].shape[1] % 64 == 0
    with torch.no_grad():
        torch.testing.assert_close(vlm(**padded).loss, vlm(**vlm.collate([conv])).loss)


def test_only_projector_and_added_rows_train(vlm):
    vlm.train()
    assert vlm.projector.training and not vlm.llm.training and not vlm.clip.training
    vlm.eval()
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {"added_embeddings"} | {
        f"projector.{n}" for n, _ in vlm.projector.named_parameters()
    }
    conv = [
        {"role": "user", "content": "What?", "images": [_image(2)]},
        {"role": "assistant", "content": "A star."},
    ]
    out = vlm(**vlm.collate([conv]))
    out.loss.backward()
    assert vlm.projector.fc1.weight.grad is not None
    assert vlm.projector.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vlm.llm.parameters())
    vlm.zero_grad(set_to_none=True)


def test_rms_output_norm_puts_visual_tokens_at_the_embeddings_scale(tmp_path):
    cfg = PolychromeConfig.from_preset("tiny")
    projector = ProjectorConfig(merge=cfg.vlm.projector.merge, output_norm="rms")
    torch.manual_seed(0)
    vlm = PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=projector))
    emb = vlm.llm.get_input_embeddings().weight.detach().float()
    emb_rms = float(emb.pow(2).mean().sqrt())  # by hand: the RMS over all coordinates
    pixels = vlm.pixel_values([_image(1), _image(2)])
    norm, vlm.projector.out_norm = vlm.projector.out_norm, None
    with torch.no_grad():
        bare = vlm.encode_images(pixels)  # the MLP's output, unnormalised
    vlm.projector.out_norm = norm
    with torch.no_grad():
        tokens = vlm.encode_images(pixels)
    # At the start every visual token has the embeddings' RMS, whatever the MLP's scale.
    rms = tokens.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, emb_rms), rtol=1e-4, atol=0)
    torch.testing.assert_close(tokens, bare / bare.pow(2).mean(-1, keepdim=True).sqrt() * emb_rms)
    # The gain is trained and saved; a checkpoint reloads with its own gain, not the initial one.
    assert "projector.out_norm.weight" in vlm.trained_state_dict()
    with torch.no_grad():
        vlm.projector.out_norm.weight.mul_(3.0)
    again = PolychromeVLM.from_pretrained(vlm.save_pretrained(tmp_path / "rms"))
    assert again.config.projector.output_norm == "rms"
    with torch.no_grad():
        torch.testing.assert_close(again.encode_images(pixels), vlm.encode_images(pixels))
    with pytest.raises(ValueError, match="output_norm must be one of"):
        ProjectorConfig(output_norm="layer")


@pytest.mark.parametrize("features", ["local", "both"])
def test_local_features_feed_the_projector(features, tmp_path):
    cfg = PolychromeConfig.from_preset("tiny")
    projector = ProjectorConfig(merge=cfg.vlm.projector.merge, features=features, window=3)
    torch.manual_seed(0)
    vlm = PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=projector))
    pixels = vlm.pixel_values([_image(1), _image(2)])
    with torch.no_grad():
        local = dense_features(vlm.clip, pixels, window=3)
        glob = dense_features(vlm.clip, pixels)
        parts = [local.tokens] if features == "local" else [glob.tokens, local.tokens]
        expected = vlm.projector(torch.cat(parts, -1), local.grid)
        tokens = vlm.encode_images(pixels)
    assert vlm.clip_passes == len(parts)
    assert vlm.projector.norm.normalized_shape[0] == glob.tokens.shape[-1] * len(parts) * 4
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert tokens.shape[1] == vlm.tokens_per_image
    # text-only prompts still never touch CLIP or the projector: bitwise the bare LLM's
    batch = vlm.prepare([{"role": "user", "content": "Name three shapes."}])
    with torch.no_grad():
        ours = vlm(**batch).logits
        bare = vlm.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, bare)
    # saved and reloaded with its feature kind and window
    again = PolychromeVLM.from_pretrained(vlm.save_pretrained(tmp_path / "local"))
    assert (again.config.projector.features, again.config.projector.window) == (features, 3)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_images(pixels), tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="features must be one of"):
        ProjectorConfig(features="regional")
    for bad in (0, 4):
        with pytest.raises(ValueError, match="window must be an odd number"):
            ProjectorConfig(window=bad)


def test_core_config_applies_a_runs_overrides_and_names_bad_ones():
    preset = PolychromeConfig.from_preset("tiny")
    cfg = preset.vlm.core_config(
        preset.llm, preset.clip, merge=1, output_norm="rms", lora_rank=2, lora_targets=["q_proj"]
    )
    assert (cfg.projector.merge, cfg.projector.output_norm) == (1, "rms")
    assert (cfg.lora.rank, cfg.lora.targets) == (2, ["q_proj"])
    plain = preset.vlm.core_config(preset.llm, preset.clip)
    assert plain.projector == preset.vlm.projector and plain.lora.rank == 0
    local = preset.vlm.core_config(preset.llm, preset.clip, features="both", window=3)
    assert (local.projector.features, local.projector.window) == ("both", 3)
    for kwargs, message in (
        ({"merge": 0}, "merge: merge must be in"),
        ({"lora_rank": -1}, "lora: lora.rank must be >= 0"),
        ({"lora_targets": ["q_proj"]}, "lora targets need a LoRA"),
        ({"features": "regional"}, "features: features must be one of"),
        ({"features": "local", "window": 2}, "window: window must be an odd number"),
        ({"window": 3}, "window: the attention window applies to local features"),
    ):
        with pytest.raises(ValueError, match=message):
            preset.vlm.core_config(preset.llm, preset.clip, **kwargs)
    # targets are checked against the decoder's linear layers, one by one (peft alone lets a
    # typo beside a good name through), and the LM head is not one
    for targets in (["q_proj", "up_prj"], ["lm_head"]):
        cfg = preset.vlm.core_config(preset.llm, preset.clip, lora_rank=2, lora_targets=targets)
        with pytest.raises(ValueError, match=rf"\['{targets[-1]}'\] name no linear layer"):
            PolychromeVLM.build(cfg)


def _lora_vlms() -> tuple[PolychromeVLM, PolychromeVLM]:
    """The tiny VLM with a rank-4 image LoRA whose B matrices are random (peft starts them at
    zero), and the same VLM without one; both sharpened as conftest.sharpened_tiny_vlm is."""
    cfg = PolychromeConfig.from_preset("tiny")
    pair = []
    for rank in (4, 0):
        torch.manual_seed(0)
        lora = ImageLoraConfig(rank=rank)
        cfg_vlm = VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector, lora=lora)
        model = PolychromeVLM.build(cfg_vlm)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.llm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif p.ndim == 2 and "lora_" not in name:
                    p.mul_(25)
        pair.append(model)
    return pair[0], pair[1]


def test_image_lora_is_on_only_for_prompts_with_an_image(tmp_path):
    lora, plain = _lora_vlms()
    assert lora.has_image_lora and not plain.has_image_lora
    image = [{"role": "user", "content": "Describe.", "images": [_image(4)]}]
    text = lora.prepare([{"role": "user", "content": "Name three shapes."}])
    with torch.no_grad():
        with_image = lora(**lora.prepare(image)).logits
        without = plain(**plain.prepare(image)).logits
        # after an image prompt the adapters are off again: text-only logits are bitwise the
        # model's without LoRA
        assert torch.equal(lora(**text).logits, plain(**text).logits)
    assert with_image is not None and without is not None
    assert (with_image - without).abs().max() > 1e-2  # the LoRA acts on image prompts
    with torch.no_grad(), lora.image_lora():
        lora(**lora.prepare(image))  # a nested switch leaves the outer block's on
        ids = text["input_ids"]
        assert not torch.equal(lora.llm(input_ids=ids).logits, plain.llm(input_ids=ids).logits)
    # Greedy decoding, batched and streamed, runs with the LoRA too (and agrees).
    batched = lora.generate_texts([image], max_new_tokens=6)[0]
    streamed = "".join(lora.stream(lora.prepare(image), {"max_new_tokens": 6, "do_sample": False}))
    assert batched == streamed.strip()
    assert batched != plain.generate_texts([image], max_new_tokens=6)[0]
    # Training: an image conversation sends gradient to the LoRA, a text-only one does not.
    conv = [*image, {"role": "assistant", "content": "Shapes."}]
    lora(**lora.collate([conv])).loss.backward()
    grads = [p.grad for n, p in lora.llm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # (the adapters require grad: a loss that used them would too)
    assert not lora(
        **lora.collate([[{"role": "user", "content": "hi"}, conv[1]]])
    ).loss.requires_grad
    # Saved with the core, loaded back with the same effect; extensions refuse such a core.
    again = PolychromeVLM.from_pretrained(lora.save_pretrained(tmp_path / "lora"))
    assert any(k.startswith("llm.") and "lora_B" in k for k in lora.trained_state_dict())
    with torch.no_grad():
        for name, p in again.llm.named_parameters():
            if p.ndim == 2 and "lora_" not in name:
                p.mul_(25)  # the frozen LLM comes from its source: sharpen it again
        torch.testing.assert_close(again(**again.prepare(image)).logits, with_image)
    # The switch is per forward: a batch mixing image and text-only rows is refused, not run
    # with the LoRA on the text-only rows (the model without one batches them as before).
    mixed = [image, [{"role": "user", "content": "Name three shapes."}]]
    with pytest.raises(ValueError, match="1 of 2 rows hold images"):
        lora.generate_texts(mixed, max_new_tokens=2)
    assert len(plain.generate_texts(mixed, max_new_tokens=2)) == 2
    with pytest.raises(ValueError, match=r"lora\.rank must be"):
        ImageLoraConfig(rank=-1)


def test_save_and_load_store_only_the_trained_tensors(vlm, tmp_path):
    with torch.no_grad():
        vlm.projector.fc2.bias.add_(0.5)
    path = vlm.save_pretrained(tmp_path / "vlm")
    stored = load_file(str(path / "vlm.safetensors"))
    assert set(stored) == set(vlm.trained_state_dict())
    assert not any(k.startswith(("llm.", "clip.")) for k in stored)
    config = json.loads((path / "manifest.json").read_text())["config"]
    assert config["llm"]["source"] == "tiny-random-llama"
    again = PolychromeVLM.from_pretrained(path)
    batch = vlm.prepare([{"role": "user", "content": "hi", "images": [_image(3)]}])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, vlm(**batch).logits)
    data = bytearray((path / "vlm.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "vlm.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        PolychromeVLM.from_pretrained(path)


def test_batched_greedy_generation_matches_one_by_one(sharp_vlm):
    vlm = sharp_vlm
    prompts = [
        [{"role": "user", "content": "Describe.", "images": [_image(4)]}],
        [{"role": "user", "content": "A much longer question about it?", "images": [_image(5)]}],
    ]
    together = vlm.generate_texts(prompts, max_new_tokens=6)
    alone = [vlm.generate_texts([p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert together[0] != together[1]


def test_assistant_reads_images_and_refuses_what_it_cannot(sharp_vlm):
    vlm = sharp_vlm
    assistant = Assistant(
        vlm.llm, vlm.tokenizer, vlm=vlm, default_settings=SamplingSettings(max_new_tokens=5)
    )
    *partials, reply = list(assistant.chat([], "What is this?", images=[_image(6)]))
    assert all(reply.startswith(p) for p in partials)
    expected = vlm.generate_texts(
        [[{"role": "user", "content": "What is this?", "images": [_image(6)]}]], max_new_tokens=5
    )[0]
    assert reply.strip() == expected and expected
    assert reply != list(assistant.chat([], "What is this?"))[-1]  # the image matters
    with pytest.raises(ImageError):
        list(assistant.chat([], "and this?", images=[b"not an image"]))
    with pytest.raises(ValueError, match=f"at most {MAX_IMAGES}"):
        list(assistant.chat([], "all?", images=[_image(i) for i in range(MAX_IMAGES + 1)]))
    text_only = Assistant(vlm.llm, vlm.tokenizer)
    with pytest.raises(ValueError, match="text-only"):
        list(text_only.chat([], "see?", images=[_image()]))


def test_chat_records_and_conversations(shapeworld, tmp_path):
    records = read_chat_records(shapeworld / "train")
    rng = np.random.default_rng(0)
    conv = instruct_conversation(records[0], rng)
    assert conv[0]["images"] == [records[0].image]
    assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
    short = [m for m in conv if m["role"] == "user" and m["content"].endswith(SHORT_ANSWER)]
    assert len(short) == len(records[0].qa)
    cap = caption_conversation(records[1], rng)
    assert cap[1]["content"] in records[1].captions
    bad = tmp_path / "bad"
    bad.mkdir()
    _image().save(bad / "a.png")
    rows = [{"file_name": "a.png", "captions": ["ok"]}, {"file_name": "a.png", "qa": [{"q": 1}]}]
    (bad / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(FormatError, match=r"line 2: qa\[0\] must be an object"):
        read_chat_records(bad)
    assert isinstance(read_chat_records(bad, limit=1)[0], ChatRecord)


def test_answer_normalisation_and_caption_parsing():
    assert normalise_answer("The Top-left.") == "top left"
    # number words and digits are one answer (VQA's processing), "none" is zero
    assert normalise_answer("Two.") == normalise_answer("2") == "2"
    assert normalise_answer("none") == normalise_answer("zero") == "0"
    assert normalise_answer("twelve stars") == "12 stars"
    colours, shapes = ["red", "blue", "green"], ["circle", "cross", "star"]
    text = (
        "The image shows two red circles, a blue cross and three green stars on a plain background."
    )
    found = parse_objects(text, colours, shapes)
    assert found == Counter({("red", "circle"): 2, ("blue", "cross"): 1, ("green", "star"): 3})
    gold = Counter({("red", "circle"): 2, ("blue", "cross"): 2})
    scores = caption_scores([found], [gold])
    # predicted facts: 3 colours, 3 classes, 3 groups; gold: 2, 2, 2; right: 2, 2, 1 (red circles).
    assert scores["colour"] == pytest.approx(2 * 2 / (3 + 2))
    assert scores["group"] == pytest.approx(2 * 1 / (3 + 2))
    assert scores["all"] == pytest.approx(2 * 5 / (9 + 6))
    # "zero" states nothing; in a sentence relating two objects "a" is not a count (colour and
    # class only), a count elsewhere still counts
    assert parse_objects("One blue star and zero red circles.", colours, shapes) == {
        ("blue", "star"): 1
    }
    related = "A red circle is to the left of a blue star. There are two red circles."
    assert parse_objects(related, colours, shapes) == {("red", "circle"): 2, ("blue", "star"): None}
    two = Counter({("red", "circle"): 2, ("blue", "star"): 1})
    assert caption_scores([parse_objects(related, colours, shapes)], [two])["all"] == pytest.approx(
        2 * 5 / (5 + 6)
    )  # 5 true facts stated (2 colours, 2 classes, the red group) of the 6 there are


def test_the_generators_own_captions_state_no_false_fact(shapeworld):
    """Every ShapeWorld caption is true of its scene, so the scorer must find no fact in it that
    the scene lacks (relational captions said "a red circle" of two red circles: a false count)."""
    from eval.vlm import caption_facts, gold_objects

    rows = [r for split in ("train", "val") for r in read_imagefolder(shapeworld / split)]
    gold = [g for split in ("train", "val") for g in gold_objects(shapeworld / split)]
    colours, shapes = list(COLOURS), list(SHAPES)
    checked = 0
    for row, objects in zip(rows, gold, strict=True):
        for caption in row["captions"]:
            stated = caption_facts(parse_objects(caption, colours, shapes))
            assert stated <= caption_facts(objects), (caption, sorted(objects.items()))
            checked += bool(stated)
    assert checked > 10


def test_train_resumes_exactly_and_eval_runs(shapeworld, tmp_path):
    common = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "4", "--align-steps", "2"]
    common += ["--batch-size", "2", "--no-progress", "--save-every", "2", "--lr", "1e-2"]
    assert train_main([*common, "--out", str(tmp_path / "straight")]) == 0
    # batches built in the loop's own thread (--prefetch 0) give the same steps, bitwise
    cut = ["--out", str(tmp_path / "cut"), "--stop-at", "2", "--prefetch", "0"]
    assert train_main([*common, *cut]) == 0
    first = (tmp_path / "cut" / "loss.jsonl").read_text().splitlines()
    assert first == (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()[:2]
    with (tmp_path / "cut" / "loss.jsonl").open("a") as f:  # a row logged after the last save
        f.write(json.dumps({"step": 3, "loss": 99.0, "tokens": 0}) + "\n")
    assert train_main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "cut" / "loss.jsonl").read_text().splitlines()]
    straight = (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the stale row dropped, none doubled
    assert [r["loss"] for r in rows] == pytest.approx([json.loads(r)["loss"] for r in straight])
    a = load_file(str(tmp_path / "straight" / "final" / "vlm.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "vlm.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    init = PolychromeVLM.build(
        VLMConfig.from_dict(
            json.loads((tmp_path / "straight" / "final" / "manifest.json").read_text())["config"]
        )
    )
    assert not torch.equal(a["projector.fc1.weight"], init.projector.fc1.weight)
    # --init-from: a new run starts from those weights (a near-zero lr keeps them).
    init = ["--init-from", str(tmp_path / "straight" / "final"), "--lr", "1e-12"]
    stage2 = [*common[:-2], "--steps", "1", "--align-steps", "0", *init]
    assert train_main([*stage2, "--out", str(tmp_path / "stage2")]) == 0
    c = load_file(str(tmp_path / "stage2" / "final" / "vlm.safetensors"))
    torch.testing.assert_close(c["projector.fc1.weight"], a["projector.fc1.weight"])
    # ... also when it adds an image LoRA (which starts at zero and trains: lr 1e-2 here).
    with_lora = [*common, "--steps", "1", "--align-steps", "0", "--lora-rank", "2"]
    with_lora += ["--init-from", str(tmp_path / "straight" / "final")]
    targets = ["--lora-targets", "q_proj", "down_proj"]  # an attention and an MLP matrix
    assert train_main([*with_lora, *targets, "--out", str(tmp_path / "lora")]) == 0
    d = load_file(str(tmp_path / "lora" / "final" / "vlm.safetensors"))
    lora_b = [k for k in d if "lora_B" in k]
    assert lora_b and any(d[k].abs().sum() > 0 for k in lora_b)
    assert {k.split(".lora_B")[0].rsplit(".", 1)[-1] for k in lora_b} == {"q_proj", "down_proj"}
    saved = json.loads((tmp_path / "lora" / "final" / "manifest.json").read_text())["config"]
    assert saved["lora"]["rank"] == 2 and saved["lora"]["targets"] == ["q_proj", "down_proj"]
    for bad in (
        ["--lora-targets", "no_such_proj"],
        ["--lora-targets", "q_proj", "up_prj"],  # a typo beside a good name
        ["--lora-targets", "lm_head"],
        ["--lora-rank", "0", "--lora-targets", "q_proj"],
    ):
        with pytest.raises(SystemExit):
            train_main([*with_lora, *bad, "--out", str(tmp_path / "bad")])
    out = tmp_path / "eval.json"
    ckpt = str(tmp_path / "straight" / "final")
    args = ["--checkpoint", ckpt, "--data", str(shapeworld), "--split", "val", "--limit", "2"]
    assert eval_main([*args, "--ttft-repeats", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["questions"] > 0
    assert 0.0 <= result["qa_accuracy"]["overall"] <= 1.0
    # every question's reply is kept, and the per-question verdicts add up to the accuracy
    replies = result["qa_replies"]
    assert len(replies) == result["questions"] and len(result["captions"]) == 2
    right = sum(r["right"] for r in replies) / len(replies)
    assert right == pytest.approx(result["qa_accuracy"]["overall"])
    assert all(r["right"] == (normalise_answer(r["reply"]) == normalise_answer(r["answer"]))
               for r in replies)  # fmt: skip
    with pytest.raises(SystemExit):
        train_main([*common, "--out", str(tmp_path / "x"), "--align-steps", "9"])
    # --merge: the saved projector reads 1x1 blocks (the preset's is 2x2); 3 does not divide.
    merged = [*common, "--steps", "1", "--align-steps", "0", "--merge", "1"]
    assert train_main([*merged, "--out", str(tmp_path / "m1")]) == 0
    saved = json.loads((tmp_path / "m1" / "final" / "manifest.json").read_text())["config"]
    assert saved["projector"]["merge"] == 1
    width = a["projector.fc1.weight"].shape[1] // 4  # the preset's merge 2: 4 patches per token
    m1 = load_file(str(tmp_path / "m1" / "final" / "vlm.safetensors"))
    assert m1["projector.fc1.weight"].shape[1] == width
    with pytest.raises(SystemExit):
        train_main([*merged[:-1], "3", "--out", str(tmp_path / "m3")])
    # --position learned: the row and column embeddings train and are saved with the projector
    assert train_main([*merged[:-2], "--position", "learned", "--out", str(tmp_path / "p")]) == 0
    saved = json.loads((tmp_path / "p" / "final" / "manifest.json").read_text())["config"]
    assert saved["projector"]["position"] == "learned"
    pos = load_file(str(tmp_path / "p" / "final" / "vlm.safetensors"))
    rows, cols = pos["projector.row_embed"], pos["projector.col_embed"]
    assert rows.ndim == cols.ndim == 2 and rows.shape[1] == cols.shape[1] == 32  # tiny LLM width


def test_train_reads_the_clip_it_is_given(shapeworld, tmp_path, capsys, monkeypatch):
    """--clip: the core reads that tower (not the preset's), and its saved config names it, so
    a reload gets the same visual features; a CLIP of another variant is refused."""
    cfg = get_clip_config("tiny-vit")
    torch.manual_seed(1)  # not the preset's seed-0 random tower
    tower = build_clip(cfg).model
    save_checkpoint(tmp_path / "clip", {TENSOR_FILE: trained_state_dict(tower, cfg)}, cfg.to_dict())
    common = ["--preset", "tiny", "--data", str(shapeworld), "--steps", "1", "--align-steps", "0"]
    common += ["--batch-size", "2", "--no-progress"]
    monkeypatch.chdir(tmp_path)  # a path on the command line is the working directory's
    assert train_main([*common, "--clip", "clip", "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "final" / "manifest.json").read_text())["config"]
    assert saved["vision"]["checkpoint"] == str((tmp_path / "clip").resolve())
    vlm = PolychromeVLM.from_pretrained(tmp_path / "a" / "final")
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        ours, theirs = dense_features(vlm.clip, pixels), dense_features(tower.eval(), pixels)
        preset = dense_features(PolychromeVLM.build(vlm.config.replace(
            vision=vlm.config.vision.replace(checkpoint=None))).clip, pixels)  # fmt: skip
    torch.testing.assert_close(ours.tokens, theirs.tokens)
    assert not torch.allclose(ours.tokens, preset.tokens)
    for bad, says in (
        (tmp_path / "nowhere", "checkpoint folder not found"),
        (tmp_path / "a" / "final", "manifest.json config"),  # a checkpoint, but a VLM's
        (project_path("checkpoints/shapes/clip"), "is CLIP 'shapes-vit'"),  # not tiny-vit
    ):
        with pytest.raises(SystemExit):
            train_main([*common, "--clip", str(bad), "--out", str(tmp_path / "bad")])
        assert says in capsys.readouterr().err


def test_mfu_bench_counts_the_llm_body_by_hand_and_reports(vlm, shapeworld, tmp_path):
    from bench import mfu

    # tiny-random-llama: 2 layers, d 32, MLP 64, 4 heads over 2 KV heads of 8 -> K, V are 32x16.
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert mfu._linear_params(vlm.llm.base_model) == 2 * per_layer
    out = tmp_path / "mfu.json"
    args = ["--preset", "tiny", "--data", str(shapeworld), "--quick", "--json", str(out)]
    assert mfu.main(args) == 0
    result = json.loads(out.read_text())
    assert result["peak_bf16_flops"] > 0 and result["train_model_flops_per_s_median"] > 0
    # below the peak where bf16 is native; without it the quick peak (a bf16 matmul) runs
    # slower than the tiny model's fp32 step, and the ratio says nothing (AVX2-only CPUs)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert result["mfu_median"] < 1 or not native
    assert result["train_tokens_per_s_median"] > 0


def test_mfu_bench_counts_the_image_lora_apart_from_the_frozen_body(shapeworld, tmp_path):
    from bench import mfu

    lora, plain = _lora_vlms()
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # as above: the base weights only
    assert mfu._linear_params(lora.llm.base_model) == 2 * per_layer
    r = lora.config.lora.rank  # A: r x in, B: out x r on q (32->32), k, v (32->16), o (32->32)
    assert mfu._lora_params(lora.llm) == 2 * (r * (32 + 32) + 2 * r * (32 + 16) + r * (32 + 32))
    image = Image.new("RGB", (64, 64), "red")
    conv = [
        {"role": "user", "content": "hi", "images": [image]},
        {"role": "assistant", "content": "a"},
    ]
    batch = lora.collate([conv])
    tokens = float(batch["attention_mask"].sum())
    # the same model without the LoRA: the difference is 6 FLOPs per LoRA weight per token
    assert mfu.step_flops(lora, batch) - mfu.step_flops(plain, batch) == pytest.approx(
        6 * mfu._lora_params(lora.llm) * tokens
    )
    text_only = lora.collate([[{"role": "user", "content": "hi"}, conv[1]]])
    assert mfu.step_flops(lora, text_only) == mfu.step_flops(plain, text_only)  # LoRA off
    out = tmp_path / "mfu.json"
    args = ["--preset", "tiny", "--data", str(shapeworld), "--quick", "--lora-rank", "2"]
    assert mfu.main([*args, "--merge", "1", "--lora-targets", "q_proj", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["lora_rank"], result["merge"], result["lora_targets"]) == (2, 1, ["q_proj"])
    with pytest.raises(SystemExit):  # a merge that does not divide the grid: a usage error
        mfu.main([*args, "--merge", "3"])


def test_text_only_logits_are_bitwise_the_real_smollm2s():
    from lm.loading import LLMConfig
    from vision.clip import ClipPresetConfig

    cfg = VLMConfig(
        llm=LLMConfig(source="smollm2-135m-instruct"), vision=ClipPresetConfig(model="tiny-vit")
    )
    real = PolychromeVLM.build(cfg)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = real.prepare(messages)
    assert real.image_token_id >= real.llm.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        ours = real(**batch).logits
        bare = real.llm(input_ids=batch["input_ids"]).logits
    assert ours is not None and torch.equal(ours, bare)


def test_assistant_decodes_with_the_library_methods_on_text_turns(sharp_vlm):
    from lm.decoding import generate_with

    vlm = sharp_vlm
    assistant = Assistant(vlm.llm, vlm.tokenizer, vlm=vlm)
    settings = SamplingSettings(max_new_tokens=6, method="conditional_beam", num_beams=3)
    (reply,) = list(assistant.chat([], "Name a shape.", settings=settings))
    ids = vlm.prepare([{"role": "user", "content": "Name a shape."}])["input_ids"]
    out = generate_with(
        "conditional_beam",
        vlm.llm,
        ids,
        num_beams=3,
        max_new_tokens=6,
        eos_token_id=vlm.tokenizer.eos_token_id,
        pad_token_id=vlm.tokenizer.pad_token_id,
    )
    assert reply == vlm.tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="text-only conversations"):
        list(assistant.chat([], "And this?", images=[_image()], settings=settings))
    with pytest.raises(ValueError, match="method must be 'default' or one of"):
        SamplingSettings(method="nucleus-magic")


def test_prompts_are_left_padded_without_touching_the_shared_tokenizer(vlm):
    """Batched generation pads on the left; the side is given to the call, so the tokenizer the
    chat, STAMP and GILL share keeps its own (a concurrent request cannot find it changed)."""
    short = [{"role": "user", "content": "Hi."}]
    long = [{"role": "user", "content": "Describe a long list of many different things, please."}]
    side = vlm.tokenizer.padding_side
    enc = vlm.left_padded([short, long])
    assert vlm.tokenizer.padding_side == side
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    alone = vlm.prepare(short)["input_ids"][0]
    assert torch.equal(enc["input_ids"][0, -len(alone) :], alone)
