"""Your own data: a folder of real photos with captions written here, bad records among them.

The README's tutorial ("Fine-tune on your own images") in test form: data.validate reports every
bad record with its line, train.vlm and train.clip stop on them or skip them as asked, and the
segmentation heads train on COCO instances drawn over the same photos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import load_checkpoint
from data.formats import FormatError
from data.validate import check_imagefolder, usable_rows
from data.validate import main as validate_main
from vlm.config import PolychromeConfig
from vlm.examples import example_images

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [  # line: the row (lines 1-3 are good)
    {"file_name": "photos/astronaut.png", "captions": ["A woman in an orange space suit."],
     "qa": [{"question": "What is she wearing?", "answer": "A space suit."}]},
    {"file_name": "photos/coffee.png", "captions": ["A cup of coffee on a saucer."]},
    {"file_name": "photos/chelsea.png", "captions": ["A tabby cat looking to the left."],
     "dialogues": [[["What animal is this?", "A cat."]]]},
    {"file_name": "photos/missing.png", "captions": ["A photo that is not there."]},
    {"file_name": "notes.png", "captions": ["Text saved with an image's name."]},
    {"file_name": "photos/coffee.png", "captions": [""]},
]  # fmt: skip
BAD_LINES = {  # line: what the report says
    4: "no such file",
    5: "notes.png",
    6: "captions",
    7: "invalid JSON",
    8: "inside",
    9: "'qa' must be a list",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mine")
    (root / "photos").mkdir()
    photos = example_images(PolychromeConfig.from_preset("tiny").shapeworld)
    for name in ("astronaut", "coffee", "chelsea"):
        # smaller copies: the test reads them many times
        Image.open(photos[name]).convert("RGB").resize((96, 96)).save(
            root / "photos" / f"{name}.png"
        )
    (root / "notes.png").write_text("not an image")
    lines = [json.dumps(r) for r in ROWS]
    lines.append('{"file_name": "photos/coffee.png", "captions": ["unterminated"')
    lines.append(json.dumps({"file_name": "../outside.png", "captions": ["Out of the folder."]}))
    lines.append(
        json.dumps({"file_name": "photos/coffee.png", "captions": ["Coffee."], "qa": None})
    )
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_every_bad_record_is_reported_with_its_line(folder, tmp_path, capsys):
    report = check_imagefolder(folder, "chat", progress=False)
    assert [n for n, _ in report.good] == [1, 2, 3]
    assert [b.line for b in report.bad] == sorted(BAD_LINES)
    for bad in report.bad:
        assert BAD_LINES[bad.line] in bad.problem or BAD_LINES[bad.line] in str(bad.file_name), bad
    assert validate_main([str(folder), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "3 good records, 6 bad" in out and "line 4 (photos/missing.png): " in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["good"] == 3 and [b["line"] for b in saved["bad"]] == sorted(BAD_LINES)
    # the captions kind asks only for captions: line 9's broken "qa" does not matter there
    captions = check_imagefolder(folder, "captions", progress=False)
    assert [b.line for b in captions.bad] == sorted(BAD_LINES)[:-1]
    clean = tmp_path / "clean"
    shutil.copytree(folder / "photos", clean / "photos")
    (clean / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n")
    assert validate_main([str(clean), "--no-progress"]) == 0


def test_stop_lists_every_bad_record_and_skip_keeps_the_rest(folder):
    with pytest.raises(FormatError) as err:
        usable_rows(folder, "chat", "stop", progress=False)
    assert all(f"line {n}" in str(err.value) for n in BAD_LINES)
    assert "--bad-records skip" in str(err.value)
    with pytest.warns(UserWarning, match="skipping bad records"):
        rows = usable_rows(folder, "chat", "skip", progress=False)
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in ROWS[:3]]


def test_fine_tune_the_vlm_and_clip_on_your_photos(folder, tmp_path, capsys):
    from train.clip import main as clip_main
    from train.vlm import main as vlm_main

    common = ["--preset", "tiny", "--imagefolder", str(folder), "--no-progress"]
    vlm = [*common, "--steps", "2", "--align-steps", "1", "--batch-size", "2"]
    with pytest.raises(SystemExit):  # the default: stop, naming every bad line
        vlm_main([*vlm, "--out", str(tmp_path / "stopped")])
    err = capsys.readouterr().err
    assert all(f"line {n}" in err for n in BAD_LINES) and not (tmp_path / "stopped").exists()
    with pytest.raises(SystemExit):  # a start that is not there: said before the model loads
        vlm_main([*vlm, "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert "--init-from" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.warns(UserWarning, match="skipping bad records"):
        assert vlm_main([*vlm, "--bad-records", "skip", "--out", str(tmp_path / "vlm")]) == 0
    assert load_checkpoint(tmp_path / "vlm" / "final").metadata["data"].startswith("imagefolder")
    with pytest.raises(SystemExit):  # the same command again would replace that run: refused
        vlm_main([*vlm, "--bad-records", "skip", "--out", str(tmp_path / "vlm")])
    assert "holds a run (last/ and final/): pass --resume" in capsys.readouterr().err
    clip = ["--preset", "tiny", "--imagefolder", str(folder), "--steps", "2", "--batch-size", "2"]
    with pytest.warns(UserWarning, match="skipping bad records"):
        assert clip_main([*clip, "--bad-records", "skip", "--out", str(tmp_path / "clip")]) == 0
    # line 9 has captions (its "qa" is broken, which CLIP does not read): 4 images
    assert load_checkpoint(tmp_path / "clip" / "final").metadata["data"]["images"] == 4


NAMES = ("astronaut", "coffee", "chelsea")


def _coco_captions(path: Path) -> Path:
    """COCO captions of the three photos (two captions each), as a captioning tool exports them."""
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"photos/{n}.png", "height": 96, "width": 96}
            for i, n in enumerate(NAMES)
        ],
        "annotations": [
            {"id": 2 * i + k + 1, "image_id": i + 1, "caption": f"{text} (take {k + 1})"}
            for i, text in enumerate(("An astronaut.", "A coffee cup.", "A cat."))
            for k in range(2)
        ],
    }
    path.write_text(json.dumps(coco))
    return path


def test_records_without_captions_align_on_their_questions(folder, tmp_path, capsys):
    """Rows with only qa (which data.validate accepts) crashed the first alignment step: they
    take their instruction conversation there; with no caption at all the run says so first."""
    import numpy as np

    from data.conversations import ChatRecord
    from train.vlm import conversations_for
    from train.vlm import main as vlm_main

    image = folder / "photos" / "chelsea.png"
    qa = [{"question": "What animal is this?", "answer": "A cat."}]
    records = [ChatRecord(image, captions=["A cat."]), ChatRecord(image, qa=qa)]
    batch = conversations_for(records, np.array([0, 1]), step=0, align_steps=5, seed=0)
    assert batch[0][-1]["content"] == "A cat."  # the caption turn
    assert "What animal is this?" in batch[1][0]["content"]  # its question, not a crash
    only_qa = tmp_path / "only_qa"
    shutil.copytree(folder / "photos", only_qa / "photos")
    rows = [{"file_name": f"photos/{n}.png", "qa": qa} for n in NAMES]
    (only_qa / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["--preset", "tiny", "--imagefolder", str(only_qa), "--no-progress", "--steps", "2"]
    argv += ["--batch-size", "2"]
    with pytest.raises(SystemExit):
        vlm_main([*argv, "--align-steps", "1", "--out", str(tmp_path / "refused")])
    assert "pass --align-steps 0" in capsys.readouterr().err
    assert vlm_main([*argv, "--align-steps", "0", "--out", str(tmp_path / "vlm")]) == 0


def test_fine_tune_the_vlm_and_gill_on_coco_captions_of_your_photos(folder, tmp_path, capsys):
    from train.gill import main as gill_main
    from train.vlm import main as vlm_main

    captions = _coco_captions(tmp_path / "captions.json")
    coco = ["--images", str(folder), "--captions-json", str(captions)]
    vlm = ["--preset", "tiny", *coco, "--steps", "2", "--align-steps", "1", "--batch-size", "2"]
    assert vlm_main([*vlm, "--out", str(tmp_path / "vlm"), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "vlm" / "final").metadata["data"].startswith("COCO captions")
    assert "3 images from COCO captions" in capsys.readouterr().out
    gill = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--compositions", "1"]
    gill += ["--caption-batch", "1", "--negatives", "1", "--mapper-width", "32"]
    gill += ["--mapper-layers", "1", "--retrieval-dim", "16", "--no-progress"]
    assert gill_main([*gill, *coco, "--out", str(tmp_path / "gill")]) == 0
    meta = json.loads((tmp_path / "gill" / "final" / "manifest.json").read_text())["metadata"]
    card = (tmp_path / "gill" / "final" / "MODEL_CARD.md").read_text()
    assert meta["command"] in card and "gill.safetensors" in card  # the command, the files
    assert meta["data"].startswith("coco-captions")
    # the imagefolder kind too, with its bad records skipped as asked
    mine = ["--imagefolder", str(folder), "--bad-records", "skip"]
    with pytest.warns(UserWarning, match="skipping bad records"):
        assert gill_main([*gill, *mine, "--out", str(tmp_path / "gill_folder")]) == 0
    assert "4 scenes from imagefolder" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one source at a time
        gill_main([*gill, *coco, "--imagefolder", str(folder), "--out", str(tmp_path / "x")])
    # eval.gill on the same photos: retrieval by each image's first caption, the recalls
    # recomputed here from the model's own query and image embeddings by a plain ranking
    from eval.gill import main as eval_main
    from generation.index import clip_embedder
    from vlm.gill import GILLVLM, request_prompt

    out = tmp_path / "gill.json"
    ev = ["--checkpoint", str(tmp_path / "gill" / "final"), "--preset", "tiny", *coco]
    assert eval_main([*ev, "--batch-size", "2", "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["n_images"] == 3 and got["data"] == str(captions)
    model = GILLVLM.from_pretrained(tmp_path / "gill" / "final").eval()
    paths = [folder / f"photos/{n}.png" for n in NAMES]
    firsts = [f"{t} (take 1)" for t in ("An astronaut.", "A coffee cup.", "A cat.")]
    with torch.inference_mode():
        images = model.image_embedder()(paths)
        queries = [
            model.retrieval_queries(model.request_states([request_prompt(c)])[1]).numpy()[0]
            for c in firsts
        ]
    clip, _ = clip_embedder("tiny")
    for key, scores in (
        ("recall", np.stack(queries) @ images.T),
        ("clip_recall", clip.embed_text(firsts) @ clip(paths).T),
    ):
        rank = [(row > row[i]).sum() for i, row in enumerate(scores)]
        assert got[key]["1"] == pytest.approx(np.mean([r < 1 for r in rank])), key
        assert set(got[key]) == {"1"}  # 3 images: R@5 and R@10 would hold whatever the model
    with pytest.raises(SystemExit):  # ShapeWorld needs the decoder's prompts too
        eval_main([*ev[:4], "--data", str(folder)])
    assert "--data needs --gen-data" in capsys.readouterr().err


def test_train_the_segmentation_heads_on_coco_instances_of_your_photos(folder, tmp_path, capsys):
    from train.seg import main as seg_main

    # one box-shaped object per photo, as an annotation tool exports them (COCO polygons)
    names = NAMES
    box = [20.0, 20.0, 76.0, 20.0, 76.0, 80.0, 20.0, 80.0]
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"photos/{n}.png", "height": 96, "width": 96}
            for i, n in enumerate(names)
        ],
        "categories": [
            {"id": i + 1, "name": c, "supercategory": "thing"}
            for i, c in enumerate(("person", "cup", "cat"))
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": i + 1, "segmentation": [box],
             "bbox": [20.0, 20.0, 56.0, 60.0], "area": 3360.0, "iscrowd": 0}
            for i in range(3)
        ],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    # an image the file names but the folder lacks: the run stops before it starts, naming it
    gone = {**coco, "images": [*coco["images"][:2], {**coco["images"][2], "file_name": "x.png"}]}
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    with pytest.raises(SystemExit):
        seg_main(["--images", str(folder), "--instances-json", str(tmp_path / "gone.json"),
                  "--out", str(tmp_path / "seg_gone"), "--no-progress"])  # fmt: skip
    assert "x.png: file not found" in capsys.readouterr().err
    argv = ["--preset", "shapes", "--images", str(folder), "--instances-json"]
    argv += [str(tmp_path / "instances.json"), "--out", str(tmp_path / "seg"), "--steps", "2"]
    assert seg_main([*argv, "--batch-size", "2", "--hidden", "16", "--no-progress"]) == 0
    assert (tmp_path / "seg" / "final" / "MODEL_CARD.md").is_file()
    # photos of different sizes share a batch (the batch was sized from its first image)
    sizes = [(96, 96), (128, 88), (84, 112)]  # (width, height)
    (tmp_path / "mixed" / "photos").mkdir(parents=True)
    for name, (w, h) in zip(names, sizes, strict=True):
        Image.open(folder / "photos" / f"{name}.png").resize((w, h)).save(
            tmp_path / "mixed" / "photos" / f"{name}.png"
        )
    for image, (w, h) in zip(coco["images"], sizes, strict=True):
        image.update(width=w, height=h)  # the box stays inside each
    (tmp_path / "mixed.json").write_text(json.dumps(coco))
    mixed = ["--preset", "shapes", "--images", str(tmp_path / "mixed"), "--instances-json"]
    mixed += [str(tmp_path / "mixed.json"), "--out", str(tmp_path / "seg_mixed"), "--steps", "2"]
    assert seg_main([*mixed, "--batch-size", "3", "--hidden", "16", "--no-progress"]) == 0
    assert (tmp_path / "seg_mixed" / "final" / "MODEL_CARD.md").is_file()

    # ... and STAMP on referring expressions about them (RefCOCO-style refs into those instances)
    from train.stamp import main as stamp_main

    refs = [
        {"ref_id": i + 1, "ann_id": i + 1, "image_id": i + 1, "category_id": i + 1,
         "split": "train", "sentences": [{"sent_id": i + 1, "sent": text, "raw": text,
                                          "tokens": text.split()}]}
        for i, text in enumerate(("the woman in the suit", "the cup", "the cat"))
    ]  # fmt: skip
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    stamp = ["--preset", "tiny", "--refs", str(tmp_path / "refs.json"), "--instances"]
    stamp += [str(tmp_path / "instances.json"), "--images", str(folder), "--steps", "2"]
    stamp += ["--batch-size", "2", "--negatives", "1", "--lora-rank", "4", "--no-progress"]
    assert stamp_main([*stamp, "--out", str(tmp_path / "stamp")]) == 0
    assert (tmp_path / "stamp" / "final" / "stamp.safetensors").is_file()


def test_evaluate_the_vlm_on_your_photos(folder, tmp_path, capsys, monkeypatch):
    """eval.vlm on an imagefolder and on COCO captions: BLEU / CIDEr-D against the references
    (no attribute F1: the rows list no objects), QA by the rows' types; bad records stop the run
    before the model loads. A model that answers with the first reference scores BLEU 1."""
    import eval.vlm
    from eval.vlm import main as eval_main
    from vlm.model import PolychromeVLM

    def no_model(args):
        raise AssertionError("the model loaded before the data was checked")

    with monkeypatch.context() as m:
        m.setattr(eval.vlm, "load_vlm", no_model)
        with pytest.raises(SystemExit):
            eval_main(["--preset", "tiny", "--imagefolder", str(folder), "--no-progress"])
        err = capsys.readouterr().err
        assert "line 4" in err and "photos/missing.png" in err
        # a qa type that is not a string: named with its line (blank lines counted)
        odd = tmp_path / "odd"
        shutil.copytree(folder / "photos", odd / "photos")
        bad = {"file_name": "photos/cat.png", "qa": [{"question": "q", "answer": "a", "type": 3}]}
        bad["file_name"] = "photos/chelsea.png"
        (odd / "metadata.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(SystemExit):
            eval_main(["--preset", "tiny", "--imagefolder", str(odd), "--no-progress"])
        assert "line 3 (photos/chelsea.png): qa[0]'s 'type' must be a string" in (
            capsys.readouterr().err
        )
    clean = tmp_path / "clean"
    shutil.copytree(folder / "photos", clean / "photos")
    rows = [dict(r) for r in ROWS[:3]]
    rows[1]["qa"] = [{"question": "What is in the cup?", "answer": "Coffee", "type": "object"}]
    # Hugging Face's detection "objects" is not ShapeWorld's: ignored, no attribute F1
    rows[2]["objects"] = {"bbox": [[0, 0, 10, 10]], "categories": [0]}
    # the astronaut again, one more caption: one image with both
    rows.append({"file_name": "photos/astronaut.png", "caption": "An astronaut."})
    (clean / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    first = {str(clean / r["file_name"]): r["captions"][0] for r in rows[:3]}
    answers = {
        str(clean / r["file_name"]): r.get("qa", [{"answer": "?"}])[0]["answer"] for r in rows[:3]
    }

    def echo(self, prompts, max_new_tokens):
        """The first reference caption, or the right answer to a short question."""
        replies = []
        for (turn,) in prompts:
            image = str(turn["images"][0])
            replies.append(
                first[image] if turn["content"] == "Describe the image." else answers[image]
            )
        return replies

    monkeypatch.setattr(PolychromeVLM, "generate_texts", echo)
    out = tmp_path / "eval.json"
    args = ["--preset", "tiny", "--imagefolder", str(clean), "--ttft-repeats", "1"]
    assert eval_main([*args, "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == result["captioned"] == 3 and result["caption_f1"] is None
    assert result["caption_references"]["bleu4"] == pytest.approx(1.0)
    assert [len(c["references"]) for c in result["examples"]] == [2, 1, 1]  # the two rows merged
    assert result["questions_by_type"] == {"other": 1, "object": 1}
    assert result["qa_accuracy"] == {"other": 1.0, "object": 1.0, "overall": 1.0}
    assert "BLEU-4 / CIDEr-D | 100.0" in capsys.readouterr().out
    # COCO captions, first two images: the echo gives each image its first of two captions
    captions = _coco_captions(tmp_path / "captions.json")
    first |= {str(folder / f"photos/{n}.png"): f"{t} (take 1)" for n, t in
              zip(NAMES, ("An astronaut.", "A coffee cup.", "A cat."), strict=True)}  # fmt: skip
    coco = ["--images", str(folder), "--captions-json", str(captions), "--limit", "2"]
    assert eval_main(["--preset", "tiny", *coco, "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["questions"] == 0 and result["qa_accuracy"] == {}
    assert result["caption_references"]["bleu1"] == pytest.approx(1.0)
    with pytest.raises(SystemExit):  # one source at a time
        eval_main(["--preset", "tiny", *coco, "--imagefolder", str(clean)])
    # --bad-records skip: the fixture's folder (five bad rows, a text file named .png) evaluates
    # its three good images, the warning names each one skipped
    first |= {str(folder / f"photos/{n}.png"): "" for n in NAMES}
    answers |= {str(folder / "photos/astronaut.png"): "A space suit."}
    skip = ["--preset", "tiny", "--imagefolder", str(folder), "--bad-records", "skip"]
    with pytest.warns(UserWarning, match="skipping 6 bad records") as caught:
        assert eval_main([*skip, "--no-progress", "--out", str(out)]) == 0
    said = str(caught[0].message)
    assert all(f"line {n}" in said for n in (4, 6, 7, 8, 9)) and "notes.png: not an image" in said
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["qa_accuracy"]["overall"] == 1.0
    # --limit counts the images that open: the first two good ones
    with pytest.warns(UserWarning, match="skipping 5 bad records"):  # notes.png not reached
        assert eval_main([*skip, "--limit", "2", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 2
