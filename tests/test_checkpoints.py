"""Regression tests of the committed checkpoints: each must still reach (a floor a little under)
the figure its model card reports, on a small val split generated here."""

from __future__ import annotations

import pytest

from core.checkpoint import verify_checkpoint
from core.config import project_path
from data.shapeworld import ShapeWorldConfig, SplitSizes, generate
from vlm.config import PolychromeConfig

SHAPES = PolychromeConfig.from_preset("shapes")
VAL_IMAGES = 100


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    """The first VAL_IMAGES images of the shapes preset's val split (same seed, same layout)."""
    root = tmp_path_factory.mktemp("val") / "shapeworld"
    cfg = ShapeWorldConfig(
        seed=SHAPES.shapeworld.seed,
        layout=SHAPES.shapeworld.layout,
        splits=SplitSizes(train=0, val=VAL_IMAGES, test=0, pretrain=0),
    )
    generate(root, cfg, workers=2, progress=False)
    return root


def test_clip_checkpoint_keeps_its_figures(val_split):
    from eval.clip import evaluate_clip
    from vision.clip import load_clip

    folder = project_path(SHAPES.clip.checkpoint)
    verify_checkpoint(folder)  # sha256 of every file against the manifest
    model, preprocess, tokenizer = load_clip(folder)
    r = evaluate_clip(model, tokenizer, preprocess, val_split, "val", progress=False)
    # Model card (1,000 val images): class 91.8 / 95.7, colour 100 / 100, t2i R@1 75.0,
    # i2t R@1 72.2. On these 100 images it measured 93.4 / 90.6, 100 / 100, 87.0, 91.0.
    assert r["class_acc_seen"] >= 0.85
    assert r["class_acc_unseen"] >= 0.80
    assert r["colour_acc_seen"] >= 0.95
    assert r["colour_acc_unseen"] >= 0.95
    assert r["t2i_r1"] >= 0.75
    assert r["i2t_r1"] >= 0.75


def test_sam_checkpoint_keeps_its_figures(val_split):
    from eval.sam import evaluate_sam
    from vision.sam import load_sam

    folder = project_path(SHAPES.sam.checkpoint)
    verify_checkpoint(folder)
    model = load_sam(folder)
    r = evaluate_sam(model, val_split, "val", amg=False, progress=False)
    # Model card (1,000 val images, H200 bf16): 1-point mIoU 90.3, box mIoU 92.5.
    # On these 100 images (CPU fp32) it measured 90.7 and 93.0.
    assert r["point_miou"] >= 0.87
    assert r["box_miou"] >= 0.90
    amg = evaluate_sam(model, val_split, "val", limit=20, progress=False)
    # AMG recall@0.5: 95.4% on the 1,000 val images, 97.6% on these 20.
    assert amg["amg_recall@0.5"] >= 0.90


@pytest.fixture(scope="module")
def decoder_val(tmp_path_factory):
    """The first 40 val images of the diffusion decoder's data (its held-out prompts)."""
    root = tmp_path_factory.mktemp("decoder") / "shapeworld_diffusion"
    data = SHAPES.diffusion.data
    splits = SplitSizes(train=0, val=40, test=0, pretrain=0)
    cfg = ShapeWorldConfig(seed=data.seed, layout=data.layout, splits=splits)
    generate(root, cfg, workers=2, progress=False)
    return root


def test_diffusion_checkpoint_keeps_its_figures(decoder_val, one_thread):
    """The ShapeWorld decoder on its first held-out one-object prompts, judged without SAM (whole
    image) to stay fast: CLIP image-text cosine and whole-image colour accuracy."""
    import numpy as np

    from eval.generation import GenerationJudge, load_prompts
    from generation.diffusion import generate as generate_images
    from generation.diffusion import load_pipeline, set_scheduler
    from vision.clip import load_clip

    preset = SHAPES.diffusion
    folder = project_path(preset.checkpoint)
    verify_checkpoint(folder)
    single, _ = load_prompts(decoder_val, "val", 12, 0)
    pipe = set_scheduler(load_pipeline(folder), preset.scheduler)
    images = []
    for start in range(0, 12, 4):  # eval.generation's seeds: prompt i uses seed i
        part = single[start : start + 4]
        images += generate_images(
            pipe,
            [it.prompt for it in part],
            seed=list(range(start, start + len(part))),
            guidance_scale=preset.guidance_scale,
            num_inference_steps=preset.num_inference_steps,
        )
    clip, preprocess, tokenizer = load_clip(project_path(SHAPES.clip.checkpoint))
    judge = GenerationJudge(clip, preprocess, tokenizer, sam=None)
    score = float(np.mean(judge.clip_score(images, [it.prompt for it in single])))
    labels = judge.whole_image(images)
    colour = np.mean([lab[0] == it.objects[0][0] for lab, it in zip(labels, single, strict=True)])
    shape = np.mean([lab[1] == it.objects[0][1] for lab, it in zip(labels, single, strict=True)])
    # Model card (100 one-object val prompts): SAM + CLIP accuracy 74.0 %, whole-image colour
    # right 100 %, class right 54 %, CLIP cosine 0.481 (real images 0.535). On these 12 prompts
    # it measured cosine 0.474, colour 12 / 12, class 6 / 12 (the checkpoint before it, 61 % on
    # the 100: 0.483, 12 / 12, 6 / 12); random weights of the same model measure 0.163 and
    # colour 1 / 12; the first, CPU-trained checkpoint 0.201 and 5 / 12.
    assert score >= 0.42
    assert colour >= 10 / 12
    assert shape >= 4 / 12


def test_mask_adapter_checkpoint_keeps_its_figures(val_split, one_thread):
    """Ground-truth masks of the first 100 val images classified among all 14 classes."""
    from data.datasets import InstanceDataset
    from eval.seg import evaluate_classifier
    from segmentation.mask_adapter import load_adapter
    from segmentation.open_vocab import OpenVocabSegmenter
    from vision.clip import load_clip

    folder = project_path("checkpoints/shapes/mask_adapter")
    verify_checkpoint(folder)
    clip, _, tokenizer = load_clip(project_path(SHAPES.clip.checkpoint))
    dataset = InstanceDataset.from_shapeworld(val_split, "val")
    adapter = OpenVocabSegmenter(clip, tokenizer, adapter=load_adapter(folder))
    r = evaluate_classifier(adapter, dataset, None, None, VAL_IMAGES, progress=False)
    pooled = evaluate_classifier(
        OpenVocabSegmenter(clip, tokenizer), dataset, None, None, VAL_IMAGES, progress=False
    )
    # Model card (200 test images): GT-mask accuracy 34.0 seen / 36.8 unseen, mask pooling 29.1 /
    # 12.3. On these 100 val images it measured 34.4 / 37.2, mask pooling 33.0 / 11.6.
    assert r["gt_masks"] == {"seen": 349, "unseen": 86}
    assert r["gt_mask_acc_seen"] >= 0.30
    assert r["gt_mask_acc_unseen"] >= 0.30
    assert r["gt_mask_acc_unseen"] >= pooled["gt_mask_acc_unseen"] + 0.15


def _vlm_figures(folder, val_split, n: int = 8):
    """(the VLM saved in `folder`, eval.vlm's figures on the first `n` val images)."""
    from data.conversations import read_chat_records
    from eval.vlm import evaluate_vlm, gold_objects
    from vlm.model import PolychromeVLM

    verify_checkpoint(folder)
    vlm = PolychromeVLM.from_pretrained(folder)
    images = val_split / "val"
    figures = evaluate_vlm(
        vlm,
        read_chat_records(images, limit=n),
        gold_objects(images, limit=n),
        ttft_repeats=0,
        progress=False,
    )
    return vlm, figures


def test_vlm_checkpoint_keeps_its_figures(val_split, one_thread):
    """checkpoints/shapes/vlm: the projector-only core (the preset's until session 13)."""
    _, r = _vlm_figures(project_path("checkpoints/shapes/vlm"), val_split)
    # Model card (100 test images): caption F1 0.454 (colour 0.845), QA 34.5 %. On these 8 val
    # images it measured caption F1 0.511 (colour 0.857) and QA 18 / 41 = 43.9 %; a random
    # projector describes no objects in the caption format and answers at most the yes/no ones.
    assert r["questions"] == 41
    assert r["caption_f1"]["all"] >= 0.45
    assert r["caption_f1"]["colour"] >= 0.75
    assert r["qa_accuracy"]["overall"] >= 0.36


def test_vlm_lora_checkpoint_keeps_its_figures(val_split, one_thread):
    """checkpoints/shapes/vlm_lora: the CPU-trained LoRA core (the preset's, sessions 13-18)."""
    vlm, r = _vlm_figures(project_path("checkpoints/shapes/vlm_lora"), val_split)
    assert vlm.config.projector == SHAPES.vlm.projector and vlm.config.lora == SHAPES.vlm.lora
    assert vlm.has_image_lora and vlm.config.lora.rank == 8 and vlm.config.projector.merge == 2
    # Model card (100 test images): caption F1 0.528 (colour 0.949), QA 43.8 %. On these 8 val
    # images it measured caption F1 0.576 (colour 0.909) and QA 19 / 41 = 46.3 %; the
    # projector-only core measures 0.511 and 18 / 41 here.
    assert r["questions"] == 41
    assert r["caption_f1"]["all"] >= 0.53
    assert r["caption_f1"]["colour"] >= 0.85
    assert r["qa_accuracy"]["overall"] >= 0.41


def test_vlm_lora_gpu_checkpoint_keeps_its_figures(val_split, one_thread):
    """checkpoints/shapes/vlm_lora_gpu: the preset's core since session 19, the LoRA core's
    recipe trained on a GPU (model card)."""
    assert project_path(SHAPES.vlm.checkpoint) == project_path("checkpoints/shapes/vlm_lora_gpu")
    vlm, r = _vlm_figures(project_path(SHAPES.vlm.checkpoint), val_split)
    assert vlm.config.projector == SHAPES.vlm.projector and vlm.config.lora == SHAPES.vlm.lora
    qa = r["qa_accuracy"]["overall"]
    # Model card (100 test images): caption F1 0.549 (colour 0.995), QA 48.4 %. On these 8 val
    # images it measured caption F1 0.579 (colour 0.957) and QA 22 / 41 = 53.7 %; the
    # CPU-trained vlm_lora 0.576 (colour 0.909) and 19 / 41 here.
    print(f"caption F1 {r['caption_f1']['all']:.3f} (colour {r['caption_f1']['colour']:.3f}), "
          f"QA {round(qa * r['questions'])} / {r['questions']}")  # fmt: skip
    assert r["questions"] == 41
    assert r["caption_f1"]["all"] >= 0.55
    assert r["caption_f1"]["colour"] >= 0.90
    assert qa >= 0.48


def test_query_decoder_checkpoint_keeps_its_figures(val_split, one_thread):
    """Class-agnostic proposals of the query mask decoder (no PMP) on the first 50 val images."""
    from data.datasets import InstanceDataset
    from segmentation.query_decoder import QueryMaskProposer, load_decoder
    from train.seg_decoder import evaluate_proposals
    from vision.clip import load_clip

    folder = project_path("checkpoints/shapes/query_decoder")
    verify_checkpoint(folder)
    clip, _, tokenizer = load_clip(project_path(SHAPES.clip.checkpoint))
    proposer = QueryMaskProposer(clip, tokenizer, load_decoder(folder))
    dataset = InstanceDataset.from_shapeworld(val_split, "val")
    r, _ = evaluate_proposals(proposer, dataset, 50, None, progress=False)
    # Model card (first 200 val images): recall@0.5 / @0.75 0.821 / 0.603. On these 50 images it
    # measured 0.829 / 0.590 (234 instances); an untrained decoder proposes nothing above the
    # score threshold.
    assert r["instances"]["all"] == 234
    assert r["recall@0.5_all"] >= 0.78
    assert r["recall@0.75_all"] >= 0.52


def test_stamp_checkpoint_keeps_its_figures(val_split, one_thread):
    """Forced segmentation of the first 60 val expressions, and <seg> chosen by the model."""
    import torch

    from data.datasets import ReferringDataset
    from eval.stamp import evaluate, text_dependence
    from vlm.stamp import StampVLM

    folder = project_path("checkpoints/shapes/stamp")
    verify_checkpoint(folder)
    model = StampVLM.from_pretrained(folder).eval()
    data = ReferringDataset.from_shapeworld(val_split, "val")
    data.items = data.items[:60]
    r = evaluate(
        data,
        {"stamp": model.segment},
        timing_samples=0,
        progress=False,
        seg_rate={"stamp": model.chooses_seg},
    )["methods"]["stamp"]
    # Model card (300 test expressions): see docs/RESULTS.md. On these 60 val expressions it
    # measured cIoU 0.221 / gIoU 0.229 and chose <seg> for all 60 (on the previous core, before
    # its move: 0.209 / 0.219; the 400-step STAMP of session 13: 0.181 / 0.177); a fresh head
    # predicts nothing (cIoU 0). Its masks follow the words: on the first 12 images, masks for
    # different objects overlap at IoU 0.56 (37 pairs), where the 400-step model's were the same
    # mask (0.98).
    assert model.vlm.config.lora == SHAPES.vlm.lora  # trained on the preset's LoRA core
    with torch.inference_mode():
        words = text_dependence(data, model.segment, images=12)
    print(
        f"cIoU {r['cIoU']:.3f}, gIoU {r['gIoU']:.3f}, <seg> {r['seg_rate']:.2f}; masks of "
        f"different objects IoU {words['mean_iou']:.2f} ({words['pairs']} pairs)"
    )  # shown by pytest -rP
    assert r["cIoU"] >= 0.20 and r["gIoU"] >= 0.21
    assert r["seg_rate"] >= 0.95
    assert words["pairs"] >= 30 and words["mean_iou"] <= 0.65


def test_gill_checkpoint_keeps_its_figures(val_split, one_thread):
    """Text -> image retrieval among the first 100 val images, and the [IMG0] decision."""
    import torch

    from eval.gill import _opens_with_img, retrieval_recall
    from train.decisions import EVAL_TEXT_PROMPTS
    from vlm.gill import GILLVLM, load_scenes

    folder = project_path(SHAPES.gill.checkpoint)
    verify_checkpoint(folder)
    gill = GILLVLM.from_pretrained(folder).eval()
    recall, last, _ = retrieval_recall(gill, load_scenes(val_split, "val", VAL_IMAGES))
    with torch.inference_mode():
        opens = (gill.decision_logits(last).argmax(-1) == gill.vocab_size).float().mean()
    text_only = [[{"role": "user", "content": t}] for t in EVAL_TEXT_PROMPTS]
    # Model card (1,000 test images): R@1 / R@5 after the retrieval refit. On these 100 val
    # images it measured 0.73 / 0.98 (before the refit 0.60 / 0.94), opened all 100 requests
    # with [IMG0] and none of the 12 held-out text-only prompts; untrained retrieval heads rank
    # at chance (R@1 0.01). The same after the move onto the LoRA core (session 13): requests
    # are text-only, which no part of the core but the frozen LLM reads.
    assert recall[1] >= 0.65 and recall[5] >= 0.93
    assert float(opens) >= 0.98
    assert sum(_opens_with_img(gill, text_only)) <= 1


def test_gill_mapper_conditions_the_decoder_to_draw_the_request(decoder_val, one_thread):
    """GILL's generation path on the decoder's first held-out one-object prompts: the mapper's
    distance to the decoder's own encoding, and the images drawn from the mapper's
    prompt_embeds, judged on the whole image (CLIP), as the decoder's own test judges it."""
    import numpy as np
    import torch

    from eval.generation import GenerationJudge, load_prompts
    from generation.diffusion import encode_prompts, load_pipeline, set_scheduler
    from generation.diffusion import generate as generate_images
    from generation.gill import generation_loss
    from vision.clip import load_clip
    from vlm.gill import GILLVLM, request_prompt

    gill = GILLVLM.from_pretrained(project_path(SHAPES.gill.checkpoint)).eval()
    single, _ = load_prompts(decoder_val, "val", 8, 0)
    prompts = [it.prompt for it in single]
    decoder = project_path(SHAPES.diffusion.checkpoint)
    pipe = set_scheduler(load_pipeline(decoder), SHAPES.diffusion.scheduler)
    with torch.inference_mode():
        _, states = gill.request_states([request_prompt(p) for p in prompts])
        mapped = gill.prompt_embeds(states).float()
        distance = float(generation_loss(mapped, encode_prompts(pipe, prompts).float()))
    images = generate_images(
        pipe,
        prompt_embeds=mapped,
        seed=list(range(len(prompts))),
        guidance_scale=SHAPES.diffusion.guidance_scale,
        num_inference_steps=SHAPES.diffusion.num_inference_steps,
    )
    clip, preprocess, tokenizer = load_clip(project_path(SHAPES.clip.checkpoint))
    judge = GenerationJudge(clip, preprocess, tokenizer, sam=None)
    score = float(np.mean(judge.clip_score(images, prompts)))
    labels = judge.whole_image(images)
    colour = np.mean([lab[0] == it.objects[0][0] for lab, it in zip(labels, single, strict=True)])
    # Model card: on these 8 prompts the refit mapper measured distance 1.06, CLIP cosine 0.458,
    # colour 8 / 8; the mapper before the refit (train.gill alone) 4.48, 0.251 and 2 / 8. With
    # session 16's decoder (the continued UNet): 1.06, 0.469, 8 / 8; after session 17's refit on
    # stories beside the captions: 1.05, 0.466, 8 / 8; refit again on the GPU-trained core
    # (session 19's files): 1.05, 0.476, 8 / 8.
    print(f"distance {distance:.2f}, CLIP cosine {score:.3f}, colour {colour * 8:.0f} / 8")  # -rP
    assert distance <= 1.25
    assert score >= 0.40
    assert colour >= 6 / 8


def test_gill_mapper_draws_what_a_story_told(decoder_val, one_thread):
    """GILL's contextual generation on the stories of the decoder's first held-out scenes: the
    mapper's output after four captioned panels against the decoder's encoding of the fifth
    scene's own caption (colours named), beside the same request without the panels; and the
    colour of the one-object fifth panels drawn from it, judged on the whole image."""
    import numpy as np
    import torch

    from data.stories import make_stories
    from eval.generation import GenerationJudge
    from generation.diffusion import encode_prompts, load_pipeline, set_scheduler
    from generation.diffusion import generate as generate_images
    from generation.gill import generation_loss
    from vision.clip import load_clip
    from vlm.gill import GILLVLM, request_prompt, story_prompt

    stories = make_stories(decoder_val, "val", 100)
    assert len(stories) == 11
    gill = GILLVLM.from_pretrained(project_path(SHAPES.gill.checkpoint)).eval()
    pipe = set_scheduler(
        load_pipeline(project_path(SHAPES.diffusion.checkpoint)), SHAPES.diffusion.scheduler
    )
    with torch.inference_mode():
        _, told = gill.request_states([story_prompt(s) for s in stories])
        _, alone = gill.request_states([request_prompt(s.last) for s in stories])
        context = gill.prompt_embeds(told).float()
        target = encode_prompts(pipe, [s.target_caption for s in stories]).float()
        with_panels = float(generation_loss(context, target))
        without = float(generation_loss(gill.prompt_embeds(alone).float(), target))
    one = [i for i, s in enumerate(stories) if len(s.objects) == 1]
    images = generate_images(
        pipe,
        prompt_embeds=context[one],
        seed=list(range(len(one))),
        guidance_scale=SHAPES.diffusion.guidance_scale,
        num_inference_steps=SHAPES.diffusion.num_inference_steps,
    )
    clip, preprocess, tokenizer = load_clip(project_path(SHAPES.clip.checkpoint))
    labels = GenerationJudge(clip, preprocess, tokenizer, sam=None).whole_image(images)
    colour = np.mean(
        [lab[0] == stories[i].objects[0][0] for lab, i in zip(labels, one, strict=True)]
    )
    # Model card (the mapper refit on training-split stories, on the GPU-trained core): on these
    # 11 stories the distance with the panels measured 3.57 against 5.33 without them, and 6 of
    # the 7 one-object panels came out in the colour the context named (session 17's refit on
    # the CPU core: 3.81, 5.24, 6 of 7); the caption-only mapper before any story refit: 6.99
    # (the panels made it worse), 5.26, and 3 of 7.
    print(
        f"stories {len(stories)}: distance {with_panels:.2f} with the panels, {without:.2f} "
        f"without; colour {colour * len(one):.0f} / {len(one)}"
    )  # shown by pytest -rP
    assert with_panels <= 4.5 and with_panels < without - 1.0
    assert colour >= 5 / 7


def test_the_shapes_assistant_segments_and_retrieves_on_one_core(one_thread):
    """The demo's model: STAMP and GILL on the shapes VLM core, GILL's committed index."""
    from vlm.assistant import Assistant, SamplingSettings
    from vlm.examples import example_images

    assistant = Assistant.from_config(SHAPES)
    assert assistant.stamp is not None and assistant.gill is not None
    assert assistant.stamp.vlm is assistant.vlm is assistant.gill.vlm
    settings = SamplingSettings(max_new_tokens=3)
    scene = example_images(SHAPES.shapeworld)["shapes-1"]
    seg = list(assistant.respond([], "Segment the red circle.", images=[scene], settings=settings))
    assert seg[-1].masks and seg[-1].text.startswith("[mask 1]")
    asked = list(assistant.respond([], "retrieve: A red circle.", settings=settings))[-1]
    assert asked.images[0].source == "retrieved"
    assert project_path(SHAPES.gill.index) in project_path(asked.images[0].path).parents
    plain = list(
        assistant.respond([], "How many shapes are there?", images=[scene], settings=settings)
    )
    assert not plain[-1].masks and not plain[-1].images
