"""GILL on the tiny preset: frozen chat, [IMG] tokens, routing, save/load, training, eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import drain_across_threads
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from data.render import LayoutConfig
from data.shapeworld import ShapeWorldConfig, SplitSizes, generate
from data.shapeworld import main as shapeworld_main
from eval.generation import load_prompts
from generation.diffusion import build_pipeline, encode_prompts, get_diffusion_config
from generation.gill import GENERATE, RETRIEVE, GILLMapperConfig
from generation.index import ImageIndex, IndexMismatchError, clip_embedder
from vlm.assistant import Assistant
from vlm.config import PolychromeConfig
from vlm.gill import (
    GILLVLM,
    IMG_TOKENS,
    ImageMaker,
    gill_config_for,
    load_scenes,
    request_prompt,
)
from vlm.model import PolychromeVLM, VLMConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = GILLMapperConfig(width=32, encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=64)


def _vlm() -> PolychromeVLM:
    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(0)
    return PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector))


def _gill() -> GILLVLM:
    vlm = _vlm()
    cfg = gill_config_for(vlm, get_diffusion_config("tiny-ldm"), mapper=SMALL, retrieval_dim=16)
    return GILLVLM(vlm, cfg).eval()


def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return build_pipeline("tiny-ldm")


@pytest.fixture(scope="module")
def gill() -> GILLVLM:
    return _gill()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gill-images")
    for i in range(4):
        _image(10 + i).save(root / f"im{i}.png")
    return root


@pytest.fixture
def maker(gill, pipe, image_dir) -> ImageMaker:
    return ImageMaker(gill, gill.build_index(image_dir), pipe, num_inference_steps=2)


def _set(param: torch.Tensor, value: float) -> None:
    with torch.no_grad():
        param.fill_(value)


def test_chat_logits_stay_bitwise_the_vlm_cores(pipe):
    core = _vlm()
    text = core.prepare([{"role": "user", "content": "Hello there"}])
    image = core.prepare([{"role": "user", "content": "What is this?", "images": [_image()]}])
    with torch.no_grad():
        before = [core(**text).logits, core(**image).logits]
    model = _gill()  # a second VLM from the same seed, with GILL attached and trained a little
    assert model.vlm.llm is not core.llm
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.1)
        model.vlm.added_embeddings.normal_(0, 1.0)
    maker = ImageMaker(model, None, pipe, num_inference_steps=2)
    list(model.stream(request_prompt("a red circle"), maker, max_new_tokens=2, force="image"))
    with torch.no_grad():
        after = [model.vlm(**text).logits, model.vlm(**image).logits]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    # the gill loop's vocabulary logits are the frozen head's: [IMG0]'s row only adds a column
    ids, attn, visual = model._batch([[{"role": "user", "content": "Hello there"}]])
    with torch.no_grad():
        last, _ = model.prefix(ids, attn, visual)
        logits = model.decision_logits(last)
    torch.testing.assert_close(logits[0, :-1], before[0][0, -1], rtol=1e-5, atol=1e-5)


def test_img0_appends_exactly_seven_tokens_and_the_mapper_reads_their_states(gill, maker):
    prompt = request_prompt("a red circle")
    n_prompt = int(gill.vlm.prepare(prompt)["input_ids"].shape[1])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = gill.heads.mapper.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].clone(), args[1].clone()))
    )
    _set(gill.img_bias, 1e4)  # the model now answers [IMG0] at every step
    _set(gill.heads.decision.fc.bias, 0.0)
    with torch.no_grad():
        gill.heads.decision.fc.bias[GENERATE] = 1e3  # always generate: the mapper runs
    try:
        gill.tokens_processed = 0
        events = list(gill.stream(prompt, maker, max_new_tokens=2, back_to_back=True))
        n_read = gill.tokens_processed
        blocked = list(gill.stream(prompt, maker, max_new_tokens=2))  # no text in between
    finally:
        hook.remove()
        _set(gill.img_bias, 0.0)
        _set(gill.heads.decision.fc.bias, 0.0)
    images = [e[1] for e in events if e[1] is not None]
    assert [im.source for im in images] == ["generated", "generated"]
    assert sum(e[1] is not None for e in blocked) == 1
    # the prompt once, then per [IMG0]: itself and the 7 appended tokens, nothing recomputed
    assert n_read == n_prompt + 2 * len(IMG_TOKENS)
    hidden, embeds = seen[0]
    assert hidden.shape == embeds.shape == (1, 8, gill.config.llm_dim)
    # naive reference: the whole sequence (prompt + [IMG0..7]) in one forward pass
    ids = gill.vlm.prepare(prompt)["input_ids"]
    full = torch.cat([ids, torch.tensor([gill.img_ids])], 1)
    with torch.no_grad():
        ref = gill.vlm.llm.base_model(inputs_embeds=gill.vlm.embed(full)).last_hidden_state
    torch.testing.assert_close(hidden, ref[:, -8:], rtol=1e-4, atol=1e-4)
    rows = [gill.vlm.config.added_tokens.index(t) for t in IMG_TOKENS]
    assert torch.equal(embeds[0], gill.vlm.added_embeddings[rows].detach())


def test_decision_routes_to_the_index_or_the_pipeline(gill, maker, image_dir):
    prompts = [request_prompt(d) for d in ("a red circle", "a blue star", "a white ring")]
    for winner, source in ((RETRIEVE, "retrieved"), (GENERATE, "generated")):
        _set(gill.heads.decision.fc.bias, 0.0)
        with torch.no_grad():
            gill.heads.decision.fc.bias[winner] = 1e3
        maker.calls = {"retrieved": 0, "generated": 0}
        images = gill.images_for(prompts, maker)
        assert [im.source for im in images] == [source] * 3
        assert maker.calls[source] == 1 and sum(maker.calls.values()) == 1  # one batch
        if source == "retrieved":
            assert all(Path(im.path).parent == image_dir.resolve() for im in images)
            assert all(-1.0 <= im.score <= 1.0 for im in images)
        else:
            assert all(im.path is None and im.image.size == (64, 64) for im in images)
    _set(gill.heads.decision.fc.bias, 0.0)
    with torch.no_grad():
        gill.heads.decision.fc.bias[GENERATE] = 1e3
    forced = gill.images_for(prompts[:1], maker, force="retrieved")  # the head is overruled
    assert forced[0].source == "retrieved"
    _set(gill.heads.decision.fc.bias, 0.0)


def test_an_index_of_other_retrieval_weights_is_refused(gill, pipe, image_dir):
    index = gill.build_index(image_dir)
    other = _gill()
    with torch.no_grad():
        other.heads.retrieval.image_proj.weight.add_(0.01)
    with pytest.raises(IndexMismatchError, match="model"):
        ImageMaker(other, index, pipe)
    # nor is it taken for one request
    maker = ImageMaker(other, pipe=pipe, num_inference_steps=1)
    _, states = other.request_states([request_prompt("a red circle")])
    with pytest.raises(IndexMismatchError, match="model"):
        maker.make(states, force="retrieved", index=index)
    mine = other.build_index(image_dir)
    assert maker.make(states, force="retrieved", index=mine)[0].source == "retrieved"
    assert maker._checked == [mine]  # checked once, not at every request
    maker.make(states, force="retrieved", index=mine)
    assert maker._checked == [mine]


def test_an_index_of_centre_cropped_images_is_refused(gill, pipe, image_dir, tmp_path):
    """Before session 23 images were centre-cropped for CLIP, and GILL's index names had no
    "/pad": such an index (its non-square images' vectors of cropped pixels) is refused."""
    gill.build_index(image_dir).save(tmp_path / "index")
    meta_file = tmp_path / "index" / "index.json"
    meta = json.loads(meta_file.read_text())
    assert meta["model"].endswith("/pad")
    meta["model"] = meta["model"].removesuffix("/pad")  # as the earlier code named it
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="model"):
        ImageMaker(gill, ImageIndex.load(tmp_path / "index"), pipe)


def test_assistant_shows_images_and_the_text_goes_on(gill, maker):
    assistant = Assistant(
        gill.vlm.llm, gill.vlm.tokenizer, vlm=gill.vlm, gill=gill, image_maker=maker
    )
    from vlm.assistant import SamplingSettings

    settings = SamplingSettings(max_new_tokens=4)
    for prefix, source in (("generate:", "generated"), ("retrieve:", "retrieved")):
        gill.tokens_processed = 0
        reply = list(assistant.respond([], f"{prefix} a red circle", settings=settings))[-1]
        assert [im.source for im in reply.images] == [source]
        assert f"[image 1: {source}]" in reply.text
        n_prompt = int(gill.vlm.prepare(request_prompt("a red circle"))["input_ids"].shape[1])
        # decoding went on after the 8 image tokens (or stopped at the end-of-turn token)
        assert gill.tokens_processed >= n_prompt + 8
    with pytest.raises(ValueError, match="after"):
        list(assistant.respond([], "generate:   ", settings=settings))
    plain = list(assistant.respond([], "Hello there", settings=settings))[-1]
    assert plain.images == []


def test_a_reply_resumed_on_other_threads_is_the_same(gill, maker):
    """Gradio resumes the streamed reply on any free worker thread: the image comes out the
    same as when one thread drains it (inference mode held across yields broke it there)."""
    from vlm.assistant import SamplingSettings

    assistant = Assistant(
        gill.vlm.llm, gill.vlm.tokenizer, vlm=gill.vlm, gill=gill, image_maker=maker
    )
    settings = SamplingSettings(max_new_tokens=3, seed=5)
    for prefix in ("generate:", "retrieve:"):
        one = list(assistant.respond([], f"{prefix} a red circle", settings=settings))[-1]
        moved = drain_across_threads(
            assistant.respond([], f"{prefix} a red circle", settings=settings)
        )[-1]
        assert moved.text == one.text and len(moved.images) == len(one.images) == 1
        a, b = moved.images[0], one.images[0]
        assert a.source == b.source
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    events = drain_across_threads(
        gill.stream(request_prompt("a red circle"), maker, max_new_tokens=2, force="image", seed=5)
    )
    assert sum(payload is not None for _, payload in events) == 1
    assert not torch.is_inference_mode_enabled()


def test_image_seeds_follow_the_settings_and_vary_without_one(gill, maker, monkeypatch):
    """A seed draws the reply's k-th image with seed + k, every time; no seed (the app's -1),
    a fresh one per reply (it was 0 + k: the same picture for every unseeded request)."""
    from vlm.assistant import SamplingSettings

    seen: list[int] = []
    make = maker.make

    def recording(states, force=None, seed=0, **kwargs):
        seen.append(seed)
        return make(states, force=force, seed=seed, **kwargs)

    monkeypatch.setattr(maker, "make", recording)
    assistant = Assistant(
        gill.vlm.llm, gill.vlm.tokenizer, vlm=gill.vlm, gill=gill, image_maker=maker
    )
    for seed in (3, 3, None, None):
        settings = SamplingSettings(max_new_tokens=2, seed=seed)
        list(assistant.respond([], "generate: a red circle", settings=settings))
    assert seen[:2] == [3, 3]
    assert seen[2] != seen[3]  # two unseeded replies: two draws (equal with p = 2^-31)


def test_reply_messages_show_the_images(gill, maker):
    import gradio as gr

    from app import reply_messages
    from vlm.assistant import Reply

    images = gill.images_for([request_prompt("a red circle")], maker, force="retrieved")
    out = reply_messages(Reply("Here: [image 1: retrieved]", images=images))
    assert isinstance(out, list) and out[0] == "Here: [image 1: retrieved]"
    assert isinstance(out[1], gr.Image) and "retrieved" in out[1].label
    assert reply_messages(Reply("just text")) == "just text"
    two = gill.images_for([request_prompt("a red circle")] * 2, maker, force="generated")
    out = reply_messages(Reply("[image 1: generated] [image 2: generated]", images=two))
    assert len(out) == 2 and isinstance(out[1], gr.Gallery)
    captions = [item["caption"] for item in out[1].value]
    assert captions == ["image 1: generated", "image 2: generated"]


def _trained_gill() -> GILLVLM:
    """The tiny GILL with random heads, rows and [IMG0] output row, as if trained."""
    model = _gill()
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.1)
        model.vlm.added_embeddings.normal_()
        model.img_out.normal_()
        model.img_bias.fill_(0.7)
    return model


def test_save_and_load_round_trip(gill, tmp_path):
    model = _trained_gill()
    path = model.save_pretrained(tmp_path / "gill")
    loaded = GILLVLM.from_pretrained(path)
    for a, b in ((model.gill_state_dict(), loaded.gill_state_dict()),
                 (model.vlm.trained_state_dict(), loaded.vlm.trained_state_dict())):  # fmt: skip
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert loaded.vlm.config.added_tokens == model.vlm.config.added_tokens
    tensors = load_file(path / "gill.safetensors")
    assert not any(k.startswith("llm") or "embed_tokens" in k for k in tensors)  # trained only
    prompt = [request_prompt("a red circle")]
    with torch.no_grad():
        a = model.prompt_embeds(model.request_states(prompt)[1])
        b = loaded.prompt_embeds(loaded.request_states(prompt)[1])
    torch.testing.assert_close(a, b)


def test_rebase_keeps_the_checkpoints_dtype_so_its_index_stays_valid(tmp_path, image_dir):
    """An fp16 GILL rebased with the default --dtype auto comes out with the same fp16 tensors,
    and an index built on it is accepted by the rebased model (a cast to another dtype rounds
    the retrieval projection, which the index's model name would refuse)."""
    from vlm.gill import main as gill_main
    from vlm.gill import saved_dtype

    model = _trained_gill()
    old_dir = model.save_pretrained(tmp_path / "old", dtype=torch.float16)
    assert saved_dtype(old_dir) == torch.float16
    index = GILLVLM.from_pretrained(old_dir).build_index(image_dir)
    core_dir = model.vlm.save_pretrained(tmp_path / "core")
    args = ["rebase", "--checkpoint", str(old_dir), "--vlm", str(core_dir)]
    assert gill_main([*args, "--out", str(tmp_path / "new")]) == 0
    a, b = load_file(old_dir / "gill.safetensors"), load_file(tmp_path / "new" / "gill.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    moved = GILLVLM.from_pretrained(tmp_path / "new")
    ImageMaker(moved, index)  # accepted: the same retrieval weights
    assert gill_main([*args, "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert saved_dtype(tmp_path / "f32") == torch.float32


def test_rebase_onto_a_core_with_an_image_lora(tmp_path, capsys):
    """GILL moved onto another core (another merge, an image LoRA): what it computes from a
    text-only request is unchanged; a prompt with an image runs the new core with its LoRA on;
    the saved folder attaches to the new core and is refused by the old one."""
    from conftest import image_lora_last_hidden

    from core.checkpoint import CheckpointError
    from vlm.gill import main as gill_main
    from vlm.model import ImageLoraConfig

    model = _trained_gill()
    old_dir = model.save_pretrained(tmp_path / "old", metadata={"history": "its training"})
    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(1)
    core_cfg = VLMConfig(
        llm=cfg.llm,
        vision=cfg.clip,
        projector=cfg.vlm.projector.replace(merge=1),
        lora=ImageLoraConfig(rank=4),
    )
    core = PolychromeVLM.build(core_cfg)
    with torch.no_grad():
        for name, p in core.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    core_dir = core.save_pretrained(tmp_path / "core")
    assert gill_main(["rebase", "--checkpoint", str(old_dir), "--vlm", str(core_dir),
                      "--out", str(tmp_path / "new")]) == 0  # fmt: skip
    with pytest.raises(SystemExit):  # an existing --out is not overwritten unasked
        gill_main(["rebase", "--checkpoint", str(old_dir), "--vlm", str(core_dir),
                   "--out", str(tmp_path / "new")])  # fmt: skip
    assert "exists" in capsys.readouterr().err
    meta = json.loads((tmp_path / "new" / "manifest.json").read_text())["metadata"]
    assert meta["history"] == "its training" and meta["rebase"]["vlm"] == str(core_dir)
    core = PolychromeVLM.from_pretrained(core_dir)
    moved = GILLVLM.from_pretrained(tmp_path / "new", vlm=core).eval()
    # the core's image LoRA is frozen with the rest of the core (GILL trains none of it)
    assert not any(p.requires_grad for p in core.llm.parameters())
    with pytest.raises(CheckpointError, match="another VLM core"):
        GILLVLM.from_pretrained(tmp_path / "new", vlm=_vlm())
    request = [request_prompt("a red circle")]
    with torch.no_grad():
        a_last, a_states = model.request_states(request)
        b_last, b_states = moved.request_states(request)
        assert torch.equal(a_last, b_last) and torch.equal(a_states.hidden, b_states.hidden)
        torch.testing.assert_close(model.prompt_embeds(a_states), moved.prompt_embeds(b_states))
        assert torch.equal(model.decision_logits(a_last), moved.decision_logits(b_last))
        # a prompt with an image: the new core's projector, with its image LoRA on
        asked = [[{"role": "user", "content": "What is this?", "images": [_image()]}]]
        ids, attn, visual = moved._batch(asked)
        last, _ = moved.prefix(ids, attn, visual)
    want = image_lora_last_hidden(core, ids, attn, visual)
    torch.testing.assert_close(last, want, rtol=1e-5, atol=1e-5)
    other = PolychromeVLM.build(core_cfg.replace(llm=cfg.llm.replace(dtype="bf16")))
    with pytest.raises(CheckpointError, match="another LLM or CLIP"):
        GILLVLM.rebase(old_dir, other)


def test_training_steps_lower_each_loss(pipe):
    images = [_image(i) for i in range(4)]
    captions = [
        [
            {"role": "user", "content": "Describe the image.", "images": [im]},
            {"role": "assistant", "content": text},
        ]
        for im, text in zip(images[:2], ["A red circle.", "Two blue stars."], strict=True)
    ]
    texts = ["A red circle.", "Two blue stars.", "A white ring.", "A green square."]
    requests = [request_prompt(t) for t in texts]
    targets = encode_prompts(pipe, texts).float()
    labels = torch.tensor([RETRIEVE, RETRIEVE, GENERATE, GENERATE])
    others = [[{"role": "user", "content": "Hello there"}]]
    # Each loss trained on its own (in the tiny random model they compete for the same rows);
    # the sum on top.
    for key in ("loss", "caption", "emit", "retrieval", "generation", "decision"):
        torch.manual_seed(0)
        model = _gill().train()
        model.heads.decision.dropout.p = 0.0  # a deterministic decision loss to compare
        # captioning lowers [IMG0]'s mass on caption text: give it some to lose
        _set(model.img_bias, 3.0 if key == "caption" else 0.0)
        embeds = model.clip_image_embeds(images[:3])
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
        rows = [model.vlm.config.added_tokens.index(t) for t in IMG_TOKENS]
        image_row = model.vlm.added_embeddings[0].detach().clone()  # <image>: must not move
        history = []
        for _ in range(6):
            losses = model.training_losses(captions, requests, targets, embeds, labels, others)
            losses[key].backward()
            if key == "loss":
                assert model.vlm.added_embeddings.grad[rows].abs().sum() > 0
                assert model.vlm.added_embeddings.grad[0].abs().sum() == 0  # only [IMG] rows
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(float(losses[key].detach()))
        assert history[-1] < history[0], (key, history)
        assert torch.equal(model.vlm.added_embeddings[0].detach(), image_row)


# -- the scripts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapeworld(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gill-data") / "sw"
    args = ["generate", "--out", str(root), "--train", "6", "--val", "2", "--test", "3"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    return root


@pytest.fixture(scope="module")
def compositions(tmp_path_factory) -> Path:
    """The decoder's kind of data: 64 px scenes of one or two objects, 12 val images."""
    root = tmp_path_factory.mktemp("gill-gen") / "world"
    cfg = ShapeWorldConfig(
        seed=0,
        layout=LayoutConfig(image_size=64, min_objects=1, max_objects=2, min_size=0.08),
        splits=SplitSizes(train=0, val=12, test=0, pretrain=0),
    )
    generate(root, cfg, workers=1, progress=False)
    return root


TRAIN_ARGS = [
    "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--compositions", "1",
    "--caption-batch", "1", "--negatives", "1", "--mapper-width", "32", "--mapper-layers", "1",
    "--retrieval-dim", "16", "--save-every", "1", "--no-progress", "--threads", "1",
]  # fmt: skip


def test_train_resumes_exactly(shapeworld, tmp_path):
    from train.gill import main as train_main

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main([*TRAIN_ARGS, "--data", str(shapeworld), "--out", str(straight)]) == 0
    args = [*TRAIN_ARGS, "--data", str(shapeworld), "--out", str(split)]
    assert train_main([*args, "--stop-at", "2"]) == 0
    assert train_main([*args, "--resume"]) == 0
    a = load_file(straight / "final" / "gill.safetensors")
    b = load_file(split / "final" / "gill.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    va = load_file(straight / "final" / "vlm.safetensors")["added_embeddings"]
    vb = load_file(split / "final" / "vlm.safetensors")["added_embeddings"]
    assert torch.equal(va, vb)
    losses = [line for line in (split / "loss.jsonl").read_text().splitlines() if line]
    assert len(losses) == 4
    with pytest.raises(SystemExit):  # other settings cannot resume this run
        train_main([*args, "--resume", "--lr", "0.5"])
    # GILL's renormalisation: after every step the [IMG] rows' mean norm is the frozen
    # vocabulary rows' mean norm (the other added rows untouched); --no-renorm leaves it
    model = GILLVLM.from_pretrained(straight / "final")
    frozen = model.vlm.llm.get_input_embeddings().weight.float().norm(dim=-1).mean()
    img = torch.tensor([model.vlm.config.added_tokens.index(t) for t in model.img_tokens])
    norms = model.vlm.added_embeddings.detach()[img].float().norm(dim=-1)
    assert float(norms.mean()) == pytest.approx(float(frozen), rel=1e-3)  # (fp16 on disk)
    plain = tmp_path / "plain"
    assert (
        train_main([*TRAIN_ARGS, "--data", str(shapeworld), "--out", str(plain), "--no-renorm"])
        == 0
    )
    vp = load_file(plain / "final" / "vlm.safetensors")["added_embeddings"].float()
    assert not 0.5 < float(vp[img].norm(dim=-1).mean()) / float(frozen) < 2  # not rescaled
    others = [i for i in range(vp.shape[0]) if i not in img.tolist()]
    torch.testing.assert_close(vp[others], va.float()[others])  # only [IMG] rows move
    with pytest.raises(SystemExit):  # renormalising or not is part of the run
        train_main([*args, "--resume", "--no-renorm"])


def test_eval_runs_on_a_tiny_shapeworld(shapeworld, compositions, tmp_path, capsys):
    import json

    from eval.gill import main as eval_main
    from eval.gill import recall_at
    from train.gill import main as train_main

    run = tmp_path / "run"
    assert train_main([*TRAIN_ARGS, "--data", str(shapeworld), "--out", str(run)]) == 0
    out = tmp_path / "gill.json"
    args = [
        "--checkpoint", str(run / "final"), "--preset", "tiny", "--data", str(shapeworld),
        "--split", "train", "--limit", "6", "--gen-data", str(compositions), "--single", "1",
        "--two", "1", "--steps", "2", "--json", str(out), "--no-progress", "--batch-size", "2",
    ]  # fmt: skip
    assert eval_main(args) == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 6
    assert "10" not in r["recall"]  # 6 images: each is among the top 10, nothing measured
    assert r["recall"]["1"] <= r["recall"]["5"]
    assert r["decision"]["n_retrieve"] == 6 and r["decision"]["n_generate"] == 2
    assert 0 <= r["decision"]["macro_f1"] <= 1
    scene_counts = {str(len(s.objects)) for s in load_scenes(shapeworld, "train", 6)}
    assert scene_counts <= set(r["decision"]["count_rule"])  # a class for every count seen
    assert set(r["decision"]["count_rule"].values()) <= {"retrieve", "generate"}
    assert 0 < r["decision"]["count_rule_macro_f1"] <= 1
    # the AUCs against a naive pairwise count over the per-request scores (ties count half)
    d = r["decision"]
    is_gen = np.array([0] * 6 + [1] * 2)

    def pairwise_auc(scores, keep=None):
        keep = np.ones(len(is_gen), bool) if keep is None else keep
        pos = np.asarray(scores)[keep & (is_gen == 1)]
        neg = np.asarray(scores)[keep & (is_gen == 0)]
        if len(pos) == 0 or len(neg) == 0:
            return None
        return pytest.approx(
            np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]), abs=1e-4
        )

    assert d["head_auc"] == pairwise_auc(d["p_generate"])
    assert d["index_score_auc"] == pairwise_auc(-np.asarray(d["index_top_score"]))
    # the same on the requests that name two objects (the slice text cannot split), and for the
    # best CLIP cosine (the tiny preset's random CLIP) against CLIP's own scores of the requests
    scenes = load_scenes(shapeworld, "train", 6)
    one, two = load_prompts(compositions, "val", 1, 1)
    pair = np.array([len(it.objects) == 2 for it in [*scenes, *one, *two]])
    assert d["n_two_object_requests"] == int(pair.sum())
    assert is_gen[pair].any() and not is_gen[pair].all()  # a scene and a prompt in it
    index_scores = -np.asarray(d["index_top_score"])
    assert d["index_score_auc_two_objects"] == pairwise_auc(index_scores, pair)
    reference, _ = clip_embedder("tiny")
    texts = [s.listing for s in scenes] + [it.prompt for it in [*one, *two]]
    sims = reference.embed_text(texts) @ reference([s.image_path for s in scenes]).T
    assert np.allclose(d["clip_top_score"], sims.max(axis=1), atol=1e-5)
    assert d["clip_score_auc"] == pairwise_auc(-sims.max(axis=1))
    assert d["clip_score_auc_two_objects"] == pairwise_auc(-sims.max(axis=1), pair)
    pred = (np.asarray(d["p_generate"]) > 0.5).astype(int)
    assert d["accuracy"] == pytest.approx(float((pred == is_gen).mean()))
    assert f"| {d['head_auc']:.3f} |" in capsys.readouterr().out  # the printed table
    for key in ("mapper_single_acc", "decoder_text_two_acc", "generation_distance"):
        assert r[key] is not None
    ranked = [[2, 0, 1, 3], [0, 1, 2, 3], [1, 2, 0, 3], [3, 0, 1, 2]]  # 4 items, 4 queries
    assert recall_at(ranked, [0, 2, 1, 3], ks=(1, 3, 4)) == {1: 0.5, 3: 1.0}


def test_count_rule_reference_is_the_best_count_to_class_map():
    from eval.gill import count_rule_f1

    # three scenes (3, 3, 2 objects), three compositions (2, 1, 1): "2" is shared.
    counts = np.array([3, 3, 2, 2, 1, 1])
    truth = np.array([RETRIEVE] * 3 + [GENERATE] * 3)
    f1, rule = count_rule_f1(counts, truth)
    # 1 -> generate, 3 -> retrieve, 2 either way: retrieve F1 6/7 and generate F1 4/5 (or the
    # reverse); the first map found keeps 2 -> retrieve.
    assert f1 == pytest.approx((6 / 7 + 4 / 5) / 2)
    assert rule == {1: GENERATE, 2: RETRIEVE, 3: RETRIEVE}
    # counts that do not overlap: a perfect rule
    assert count_rule_f1(np.array([4, 1]), np.array([RETRIEVE, GENERATE]))[0] == 1.0
    # against an exhaustive search over every count -> class map (shared or not)
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts, truth = rng.integers(1, 6, 30), rng.integers(0, 2, 30)
        values = sorted(set(counts.tolist()))
        best = max(
            _macro_f1_of(np.array([bits >> values.index(c) & 1 for c in counts]), truth)
            for bits in range(2 ** len(values))
        )
        assert count_rule_f1(counts, truth)[0] == pytest.approx(best)


def _macro_f1_of(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(
        f1_score(truth, pred, average="macro", labels=[RETRIEVE, GENERATE], zero_division=0)
    )
