"""train.gill_mapper and train.gill_retrieval: heads refit on cached [IMG] states, everything else
left as it was."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from data.datasets import CaptionDataset
from data.shapeworld import main as shapeworld_main
from data.stories import make_stories
from generation.diffusion import encode_prompts, pipeline_from_preset
from train.gill import main as gill_main
from train.gill_mapper import draw_requests, is_story, request_items, val_distance
from train.gill_mapper import main as mapper_main
from vlm.config import PolychromeConfig
from vlm.gill import GILLVLM, REQUEST_TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ShapeWorld and a GILL trained on it for 2 steps (the folder to refit)."""
    root = tmp_path_factory.mktemp("gill-mapper")
    data = root / "sw"
    args = ["generate", "--out", str(data), "--train", "8", "--val", "2", "--test", "2"]
    shapeworld_main([*args, "--pretrain", "0", "--image-size", "64", "--workers", "1"])
    gill = [
        "--preset", "tiny", "--data", str(data), "--out", str(root / "gill"), "--steps", "2",
        "--batch-size", "2", "--compositions", "1", "--caption-batch", "1", "--negatives", "1",
        "--mapper-width", "32", "--mapper-layers", "1", "--retrieval-dim", "16",
        "--no-progress",
    ]  # fmt: skip
    assert gill_main(gill) == 0
    return data, root / "gill" / "final"


def _args(data: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(data),
        "--split", "train", "--out", str(out), "--requests", "20", "--compositions", "6",
        "--val", "6", "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "3",
        "--save-every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def test_requests_are_a_pure_function_of_their_arguments():
    captions = [f"caption {i}" for i in range(10)] * 2  # duplicates count once
    pairs = draw_requests(captions, 6, 3, seed=1)
    assert pairs == draw_requests(captions, 6, 3, seed=1) != draw_requests(captions, 6, 3, seed=2)
    assert len(pairs) == 9
    drawn = [c for _, c in pairs if c.startswith("caption")]
    assert len(drawn) == len(set(drawn)) == 6
    for request, caption in pairs:  # each caption sits inside one of the request templates
        assert any(t.format(caption) == request for t in REQUEST_TEMPLATES)
    assert len(draw_requests(captions, 50, 0, seed=0)) == 10  # at most every distinct caption


def test_refit_changes_the_mapper_only_and_lowers_its_distance(base, tmp_path):
    data, checkpoint = base
    out = tmp_path / "run"
    assert mapper_main(_args(data, checkpoint, out)) == 0
    before = load_file(str(checkpoint / "gill.safetensors"))
    after = load_file(str(out / "final" / "gill.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.mapper.") for k in changed)
    rows = load_file(str(checkpoint / "vlm.safetensors"))
    assert all(torch.equal(v, load_file(str(out / "final" / "vlm.safetensors"))[k])
               for k, v in rows.items())  # fmt: skip
    meta = json.loads((out / "final" / "manifest.json").read_text())["metadata"]
    assert meta["val_distance"] < meta["val_distance_base"]
    command = "python -m train.gill_mapper " + shlex.join(_args(data, checkpoint, out))
    assert meta["command"] == command
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, 7))
    assert [r["step"] for r in curve if "val_distance" in r] == [3, 6]
    # the refit mapper is what a loaded model generates from
    model = GILLVLM.from_pretrained(out / "final")
    assert torch.equal(model.heads.mapper.fc_out.weight, after["heads.mapper.fc_out.weight"])


def test_an_interrupted_refit_resumes_to_the_same_mapper_and_reuses_its_cache(base, tmp_path):
    data, checkpoint = base
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert mapper_main(_args(data, checkpoint, straight)) == 0
    assert mapper_main(_args(data, checkpoint, split, "--stop-at", "3")) == 0
    part = split / "cache" / "part-0000.safetensors"
    stamp = part.stat().st_mtime_ns
    assert mapper_main(_args(data, checkpoint, split, "--resume")) == 0
    assert part.stat().st_mtime_ns == stamp  # read back, not recomputed
    a = load_file(str(straight / "final" / "gill.safetensors"))
    b = load_file(str(split / "final" / "gill.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [json.loads(r) for r in (split / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    with pytest.raises(SystemExit):  # other settings cannot resume this run
        mapper_main(_args(data, checkpoint, split, "--resume", "--lr", "0.5"))


def test_retrieval_refit_changes_the_retrieval_heads_only_and_logs_val_recall(base, tmp_path):
    from train.gill_retrieval import main as retrieval_main

    data, checkpoint = base
    out = tmp_path / "ret"
    args = [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(data),
        "--out", str(out), "--scenes", "8", "--val", "2", "--steps", "4", "--batch-size", "4",
        "--lr", "1e-2", "--eval-every", "2", "--no-progress",
    ]  # fmt: skip
    assert retrieval_main(args) == 0
    before = load_file(str(checkpoint / "gill.safetensors"))
    after = load_file(str(out / "final" / "gill.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.retrieval.") for k in changed)
    meta = json.loads((out / "final" / "manifest.json").read_text())["metadata"]
    assert meta["command"] == "python -m train.gill_retrieval " + shlex.join(args)
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "R@1" in r] == [2, 4]
    assert all(0.0 <= r["R@1"] <= r["R@5"] <= 1.0 for r in curve if "R@1" in r)
    # the cache depends on the [IMG] rows, not on the heads: a refit of the refit reuses it
    part = out / "cache_train" / "part-0000.safetensors"
    stamp = part.stat().st_mtime_ns
    again = [*args[:3], str(out / "final"), *args[4:]]
    assert retrieval_main(again) == 0
    assert part.stat().st_mtime_ns == stamp


def test_story_requests_train_the_mapper_on_the_fifth_scenes_caption(base, stories_world, tmp_path):
    """--stories: contextual requests (four captioned panels, then the fifth caption) enter the
    cache beside the plain ones, with the fifth scene's own caption as their target, on a core
    whose image LoRA refuses batches that mix them; the held-out stories' distance is reported
    apart."""

    checkpoint = _on_an_image_lora_core(base[1], tmp_path)  # stories and text apart in a batch
    world = stories_world  # the decoder's kind: one or two objects per scene
    out = tmp_path / "stories"
    args = [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(world),
        "--split", "val", "--out", str(out), "--requests", "10", "--compositions", "2",
        "--stories", "8", "--val", "8", "--steps", "4", "--batch-size", "4", "--lr", "3e-3",
        "--eval-every", "2", "--no-progress",
    ]  # fmt: skip
    assert mapper_main(args) == 0
    stories = make_stories(world, "val", 8, seed=0)
    assert len(stories) == 8
    captions = CaptionDataset.from_shapeworld(world, "val").captions
    pairs = draw_requests([c for caps in captions for c in caps], 10, 2, seed=0)  # the run's
    items = request_items(pairs, stories, seed=0)
    told = [(turns, cap) for turns, cap in items if is_story(turns)]
    assert len(items) == 20 and sorted(cap for _, cap in told) == sorted(
        s.target_caption for s in stories
    )
    for turns, cap in told:
        story = next(s for s in stories if s.target_caption == cap)
        assert [t["content"] for t in turns[1:-1:2]] == [c for _, c in story.context]
        assert story.last in turns[-1]["content"] and cap not in turns[-1]["content"]
    meta = json.loads((out / "final" / "manifest.json").read_text())["metadata"]
    assert meta["stories"] == 8 and meta["requests"] == 20
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "val_distance_stories" in r] == [2, 4]
    # the cache, row by row in the items' order: each request's [IMG] states as when it runs on
    # its own (batching and padding change nothing), and the encoding of its caption
    cache = load_file(str(out / "cache" / "part-0000.safetensors"))
    model = GILLVLM.from_pretrained(checkpoint).eval()
    assert model.vlm.has_image_lora
    pipe = pipeline_from_preset(PolychromeConfig.from_preset("tiny").diffusion)
    with torch.no_grad():
        for k, (turns, _) in enumerate(items):
            _, alone = model.request_states([turns])
            torch.testing.assert_close(cache["hidden"][k], alone.hidden[0].float(), msg=str(k))
        targets = encode_prompts(pipe, [cap for _, cap in items]).float()
    torch.testing.assert_close(cache["targets"], targets)
    # the held-out stories' distance is that of the trained mapper on the story rows of the tail
    tail = [k for k in range(20 - 8, 20) if is_story(items[k][0])]
    assert tail
    trained = GILLVLM.from_pretrained(out / "final").eval()
    with torch.no_grad():
        embeds = trained.vlm.embed(torch.tensor(trained.img_ids)[None]).float()
    want = val_distance(trained, cache["hidden"][tail], embeds, cache["targets"][tail])
    assert meta["val_distance_stories"] == pytest.approx(want, abs=1e-3)


def _on_an_image_lora_core(checkpoint: Path, tmp_path: Path) -> Path:
    """`checkpoint` moved onto a tiny core with an image LoRA (vlm.gill rebase), whose batches
    must hold images in every row or in none."""
    from vlm.gill import main as gill_cli
    from vlm.model import ImageLoraConfig, PolychromeVLM, VLMConfig

    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(1)
    core = PolychromeVLM.build(
        VLMConfig(
            llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector,
            lora=ImageLoraConfig(rank=4),
        )
    )  # fmt: skip
    with torch.no_grad():
        for name, p in core.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    core_dir = core.save_pretrained(tmp_path / "core")
    out = tmp_path / "rebased"
    args = ["rebase", "--checkpoint", str(checkpoint), "--vlm", str(core_dir), "--out", str(out)]
    assert gill_cli(args) == 0
    return out


@pytest.fixture(scope="module")
def decoder_world(tmp_path_factory) -> Path:
    """The decoder's kind of data with a pretrain split: 64 px scenes of one or two objects."""
    from data.shapeworld import LayoutConfig, ShapeWorldConfig, SplitSizes, generate

    root = tmp_path_factory.mktemp("decoder") / "world"
    cfg = ShapeWorldConfig(
        seed=1,
        layout=LayoutConfig(image_size=64, min_objects=1, max_objects=2, min_size=0.08),
        splits=SplitSizes(train=0, val=6, test=0, pretrain=8),
    )
    generate(root, cfg, workers=1, progress=False)
    return root


def _decision_args(data: Path, gen: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--checkpoint", str(checkpoint), "--data", str(data),
        "--gen-data", str(gen), "--out", str(out), "--scenes", "8", "--captions", "6",
        "--compositions", "2", "--val-scenes", "2", "--val-captions", "4", "--val-gen-from", "0",
        "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "3",
        "--no-progress", *extra,
    ]  # fmt: skip


def test_best_margin_is_the_best_threshold_a_brute_force_search_finds():
    from train.gill_decision import best_margin

    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(0, 2, 40)
        margins = rng.normal(size=40) + 1.5 * truth
        t, f1 = best_margin(margins, truth)
        grid = np.append(margins, margins.min() - 1)  # `> m` for every m: every split there is
        brute = max(f1_score(truth, (margins > g).astype(int), average="macro") for g in grid)
        assert f1 == pytest.approx(brute)
        assert f1_score(truth, (margins > t).astype(int), average="macro") == pytest.approx(f1)
    # a separable set is split perfectly; at equal F1 the threshold nearest 0 is kept
    assert best_margin(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1])) == (0.0, 1.0)


def test_decision_refit_changes_the_decision_head_only_and_sets_its_prior(
    base, decoder_world, tmp_path
):
    from train.gill_decision import build_parser as decision_parser
    from train.gill_decision import held_out_requests, main
    from vlm.gill import request_prompt

    data, checkpoint = base
    out = tmp_path / "decision"
    args = _decision_args(data, decoder_world, checkpoint, out)
    assert main(args) == 0
    before = load_file(str(checkpoint / "gill.safetensors"))
    after = load_file(str(out / "final" / "gill.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("heads.decision.") for k in changed)
    rows = load_file(str(checkpoint / "vlm.safetensors"))
    final_rows = load_file(str(out / "final" / "vlm.safetensors"))
    assert all(torch.equal(v, final_rows[k]) for k, v in rows.items())
    meta = json.loads((out / "final" / "manifest.json").read_text())["metadata"]
    assert meta["command"] == "python -m train.gill_decision " + shlex.join(args)
    curve = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "val_macro_f1" in r] == [3, 6]
    # the saved head's argmax on the held-out requests, recomputed from the loaded model
    model = GILLVLM.from_pretrained(out / "final").eval()
    held = held_out_requests(decision_parser().parse_args(args))
    assert [y for *_, y in held] == [0, 0, 1, 1, 1, 1]
    with torch.inference_mode():
        _, states = model.request_states([request_prompt(d, t) for d, t, _ in held])
        pred = (model.p_generate(states) > 0.5).long().numpy()
    truth = np.array([y for *_, y in held])
    f1 = f1_score(truth, pred, average="macro")
    assert f1 == pytest.approx(meta["val_final"]["val_macro_f1"], abs=1e-6)
    assert f1 >= meta["val_balanced"]["val_macro_f1"]  # t = 0 is among the candidates
    # --no-prior keeps the balanced head: its bias is the trained one
    plain = tmp_path / "plain"
    assert main(_decision_args(data, decoder_world, checkpoint, plain, "--no-prior")) == 0
    plain_meta = json.loads((plain / "final" / "manifest.json").read_text())["metadata"]
    assert plain_meta["prior_margin"] == 0.0
    bias = load_file(str(plain / "final" / "gill.safetensors"))["heads.decision.fc.bias"]
    shift = (after["heads.decision.fc.bias"] - bias).float()
    assert shift[1].item() == pytest.approx(-meta["prior_margin"], abs=1e-2)  # fp dtype of saving
    assert shift[0].item() == pytest.approx(0.0, abs=1e-6)
    # --prior-only refits nothing: the trained head's weights, its generate bias moved alone
    prior = tmp_path / "prior"
    assert main(_decision_args(data, decoder_world, checkpoint, prior, "--prior-only")) == 0
    kept = load_file(str(prior / "final" / "gill.safetensors"))
    prior_meta = json.loads((prior / "final" / "manifest.json").read_text())["metadata"]
    assert prior_meta["steps_run"] == 0 and not (prior / "cache_train").exists()
    assert all(torch.equal(before[k], kept[k]) for k in before if k != "heads.decision.fc.bias")
    moved = (kept["heads.decision.fc.bias"] - before["heads.decision.fc.bias"]).float()
    assert moved[0].item() == 0.0
    assert moved[1].item() == pytest.approx(-prior_meta["prior_margin"], abs=1e-2)
    assert prior_meta["val_final"]["val_macro_f1"] >= prior_meta["val_as_loaded"]["val_macro_f1"]


def test_decision_refit_refuses_held_out_splits_and_short_data(
    base, decoder_world, tmp_path, capsys
):
    from train.gill_decision import main

    data, checkpoint = base
    for extra, message in (
        (["--gen-split", "val"], "--gen-split"),
        (["--splits", "val"], "--splits"),
        (["--captions", "50"], "fewer than the 50"),
        (["--prior-only", "--no-prior"], "not allowed with"),
    ):
        with pytest.raises(SystemExit):
            main(_decision_args(data, decoder_world, checkpoint, tmp_path / "x", *extra))
        assert message in capsys.readouterr().err


def test_decision_refit_help_names_its_commands(capsys):
    from train.gill_decision import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "python -m train.gill_decision --data" in shown and "--prior-only" in shown
