"""generation.index: exact = brute force, approximate recall, persistence, incremental add,
model checks, the CLI on the tiny preset; bench.retrieval_index smoke test."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench import retrieval_index
from bench.retrieval_index import clustered_vectors
from generation.index import (
    META_FILE,
    ImageIndex,
    ImageIndexError,
    IndexEntry,
    IndexMismatchError,
    IndexParams,
    UnreadableImagesWarning,
    auto_nlist,
    main,
)


def _entries(n: int, prefix: str = "/img") -> list[IndexEntry]:
    return [IndexEntry(f"{prefix}/{i:05d}.png", 0, 0) for i in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


class CountingEmbedder:
    """A stand-in image model: a 4x4 grey thumbnail plus a constant, counting images seen."""

    def __init__(self, name: str = "thumb-4x4", dim: int = 17) -> None:
        self.name, self.dim = name, dim
        self.calls = 0
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls += 1
        self.seen.extend(im.size for im in images)
        thumbs = [np.asarray(im.convert("L").resize((4, 4)), "f4") / 255 for im in images]
        return np.stack([np.append(t, 1) for t in thumbs])[:, : self.dim]


def _draw(path, colour: str, shape: str, size: int = 64, offset: int = 0) -> None:
    img = Image.new("RGB", (size, size), "white")
    box = (8 + offset, 8, size - 8, size - 8 - offset)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    """Four small PNGs (one in a subfolder) and one corrupt file."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _draw(root / "red_circle.png", "red", "circle")
    _draw(root / "blue_square.png", "blue", "square")
    _draw(root / "green_circle.png", "green", "circle", offset=12)
    _draw(root / "sub" / "black_square.png", "black", "square", offset=20)
    (root / "notes.txt").write_text("not an image")  # ignored by suffix
    return root


# --------------------------------------------------------------------------------------------
# Search correctness
# --------------------------------------------------------------------------------------------


def test_exact_search_equals_numpy_brute_force_top_k():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((500, 24)).astype("f4")
    queries = rng.standard_normal((7, 24)).astype("f4") * 3  # any norm: normalised inside
    index = ImageIndex("m", 24, "exact")
    index.add(db, _entries(500), model="m")
    result = index.search(queries, k=10)
    sims = _unit(queries) @ _unit(db).T  # (7, 500) cosines
    want_ids = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(result.ids, want_ids)
    np.testing.assert_allclose(result.scores, np.take_along_axis(sims, want_ids, 1), atol=1e-5)
    assert result.paths[0][0] == f"/img/{want_ids[0, 0]:05d}.png"


def test_k_larger_than_the_index_pads_with_minus_one():
    index = ImageIndex("m", 4, "exact")
    index.add(np.eye(4, dtype="f4")[:3], _entries(3), model="m")
    result = index.search(np.eye(4, dtype="f4")[:1], k=5)
    assert result.ids[0, 0] == 0 and set(result.ids[0, :3].tolist()) == {0, 1, 2}
    assert result.ids[0, 3:].tolist() == [-1, -1]
    assert result.paths[0][3:] == [None, None]
    assert (result.scores[0, 3:] < -1e30).all()  # the filler score: below any cosine


@pytest.mark.parametrize(
    ("kind", "params"), [("ivf", IndexParams(nprobe=8)), ("hnsw", IndexParams(ef_search=32))]
)
def test_approximate_recall_at_10_on_clustered_data(kind, params):
    rng = np.random.default_rng(0)
    x = clustered_vectors(6000, 32, clusters=60, spread=1.0, rng=rng)
    db, queries = x[:5800], x[5800:]
    exact = ImageIndex("m", 32, "exact")
    exact.add(db, _entries(5800), model="m")
    approx = ImageIndex("m", 32, kind, params)  # type: ignore[arg-type]
    approx.add(db, _entries(5800), model="m")
    truth = exact.search(queries, 10).ids
    recall = _recall_at_10(approx.search(queries, 10).ids, truth)
    assert recall >= 0.95, recall
    if kind == "ivf":
        assert approx.info()["nlist"] == auto_nlist(5800) == 76
        # One cell of 76 scanned loses neighbours in the adjacent cells; all cells = exact.
        one = _recall_at_10(approx.search(queries, 10, nprobe=1).ids, truth)
        assert one < recall
        assert _recall_at_10(approx.search(queries, 10, nprobe=76).ids, truth) == 1.0


def test_ivf_refits_its_cells_when_the_index_has_grown():
    rng = np.random.default_rng(1)
    x = clustered_vectors(4000, 16, clusters=20, spread=1.0, rng=rng)
    index = ImageIndex("m", 16, "ivf")
    index.add(x[:100], _entries(100, "/a"), model="m")
    assert index.info()["trained_on"] == 100 and index.info()["nlist"] == 2
    index.add(x[100:300], _entries(200, "/b"), model="m")  # 300 <= 4 x 100: cells kept
    assert index.info()["trained_on"] == 100
    index.add(x[300:], _entries(3700, "/c"), model="m")  # 4000 > 4 x 100: refit on all
    assert index.info()["trained_on"] == 4000 and index.info()["nlist"] == auto_nlist(4000)
    assert len(index) == 4000
    np.testing.assert_allclose(index.vectors(), _unit(x), atol=1e-6)  # rows kept in order


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_and_load_give_identical_results(tmp_path, kind):
    rng = np.random.default_rng(2)
    x = clustered_vectors(1200, 16, clusters=12, spread=1.0, rng=rng)
    index = ImageIndex("m", 16, kind, IndexParams(nprobe=3), {"note": "hi"})  # type: ignore[arg-type]
    index.add(x[:1000], _entries(1000), model="m")
    index.save(tmp_path / "idx")
    loaded = ImageIndex.load(tmp_path / "idx")
    a, b = index.search(x[1000:], 10), loaded.search(x[1000:], 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.paths == b.paths
    assert (loaded.model, loaded.dim, loaded.kind, loaded.params) == ("m", 16, kind, index.params)
    assert loaded.metadata == {"note": "hi"} and loaded.entries == index.entries
    # Adding after a reload and saving again leaves one vectors file, named in index.json.
    loaded.add(x[1000:], _entries(200, "/more"), model="m")
    loaded.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    meta = json.loads((tmp_path / "idx" / META_FILE).read_text())
    assert files == sorted([META_FILE, meta["faiss_file"]])
    assert len(ImageIndex.load(tmp_path / "idx")) == 1200


def test_load_reports_missing_and_corrupt_indexes(tmp_path):
    with pytest.raises(ImageIndexError, match="no image index here"):
        ImageIndex.load(tmp_path)
    index = ImageIndex("m", 4)
    index.add(np.eye(4, dtype="f4"), _entries(4), model="m")
    index.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    vectors = tmp_path / meta["faiss_file"]
    vectors.write_bytes(vectors.read_bytes()[:-8] + b"12345678")
    with pytest.raises(ImageIndexError, match="sha256 differs"):
        ImageIndex.load(tmp_path)
    vectors.unlink()
    with pytest.raises(ImageIndexError, match="which is missing"):
        ImageIndex.load(tmp_path)


@pytest.mark.parametrize("verify", [True, False])
def test_a_save_during_a_load_gives_the_new_index(tmp_path, monkeypatch, verify):
    """A reader that read index.json just before a save replaced it (and deleted the vectors
    file it names) starts again from the new JSON instead of failing on a missing file."""
    import generation.index as gi

    old, new = ImageIndex("m", 4), ImageIndex("m", 4)
    old.add(np.eye(4, dtype="f4"), _entries(4, "/old"), model="m")
    new.add(np.eye(4, dtype="f4")[::-1].copy(), _entries(4, "/new"), model="m")
    old.save(tmp_path)
    real = gi.sha256_file if verify else gi.faiss.read_index
    saves: list[int] = []

    def save_then(*args):
        if not saves:  # the first vectors read: another process saves in between
            saves.append(1)
            new.save(tmp_path)
        return real(*args)

    if verify:
        monkeypatch.setattr(gi, "sha256_file", save_then)
    else:
        monkeypatch.setattr(gi.faiss, "read_index", save_then)
    loaded = ImageIndex.load(tmp_path, verify=verify)
    assert saves and loaded.entries == new.entries
    np.testing.assert_array_equal(
        loaded.search(np.eye(4, dtype="f4"), 1).ids, new.search(np.eye(4, dtype="f4"), 1).ids
    )


def test_an_empty_index_saves_loads_and_refuses_to_search(tmp_path):
    ImageIndex("m", 8, "ivf").save(tmp_path)
    loaded = ImageIndex.load(tmp_path)
    assert len(loaded) == 0 and loaded.kind == "ivf"
    with pytest.raises(ImageIndexError, match="empty"):
        loaded.search(np.ones((1, 8), "f4"))


# --------------------------------------------------------------------------------------------
# Incremental add from a folder, model checks
# --------------------------------------------------------------------------------------------


def test_add_folder_embeds_only_new_and_changed_files(folder):
    embedder = CountingEmbedder()
    index = ImageIndex(embedder.name, embedder.dim)
    report = index.add_folder(folder, embedder, batch_size=3, progress=False)
    assert len(report.added) == 4 and len(embedder.seen) == 4 and embedder.calls == 2
    assert all(p.startswith(str(folder.resolve())) for p in report.added)

    report = index.add_folder(folder, embedder, progress=False)  # nothing new
    assert report.unchanged == 4 and report.embedded == 0 and len(embedder.seen) == 4

    _draw(folder / "sub" / "new.png", "purple", "circle")  # one new file
    report = index.add_folder(folder, embedder, progress=False)
    assert [os.path.basename(p) for p in report.added] == ["new.png"]
    assert len(embedder.seen) == 5 and report.unchanged == 4

    changed = folder / "blue_square.png"  # one changed file: re-embedded, still one entry
    _draw(changed, "blue", "circle", size=80)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (folder / "red_circle.png").unlink()  # one deleted file: its entry goes
    report = index.add_folder(folder, embedder, progress=False)
    assert [os.path.basename(p) for p in report.updated] == ["blue_square.png"]
    assert [os.path.basename(p) for p in report.removed] == ["red_circle.png"]
    assert embedder.seen[-1] == (80, 80) and len(embedder.seen) == 6
    assert len(index) == 4 and sorted(os.path.basename(e.path) for e in index.entries) == [
        "black_square.png",
        "blue_square.png",
        "green_circle.png",
        "new.png",
    ]
    # The changed file's row holds its new embedding, not the old one.
    query = embedder([Image.open(changed)])
    row = index.entries.index(next(e for e in index.entries if e.path == str(changed.resolve())))
    np.testing.assert_allclose(index.vectors()[row], _unit(query)[0], atol=1e-6)
    assert index.search(query, 1).paths[0][0] == str(changed.resolve())


def test_symlinked_files_are_entries_of_their_own_and_go_with_their_link(folder, tmp_path):
    _draw(tmp_path / "outside.png", "orange", "circle")
    (folder / "alias.png").symlink_to(folder / "red_circle.png")
    (folder / "out_link.png").symlink_to(tmp_path / "outside.png")
    embedder = CountingEmbedder()
    index = ImageIndex(embedder.name, embedder.dim)
    index.add_folder(folder, embedder, progress=False)
    names = sorted(os.path.relpath(e.path, folder.resolve()) for e in index.entries)
    assert names == [
        "alias.png",
        "blue_square.png",
        "green_circle.png",
        "out_link.png",
        "red_circle.png",
        os.path.join("sub", "black_square.png"),
    ]  # each name once, links by their own name inside the folder
    (folder / "alias.png").unlink()
    (folder / "out_link.png").unlink()
    report = index.add_folder(folder, embedder, progress=False)
    assert sorted(os.path.basename(p) for p in report.removed) == ["alias.png", "out_link.png"]
    assert len(index) == 4 and report.unchanged == 4


def test_a_failed_add_folder_leaves_the_index_as_it_was(folder, tmp_path):
    """ivf with 3 cells over 4 images; then two files go and two change: the 2 vectors left
    cannot fill 3 cells, FAISS refuses, and the index (in memory and saved) is the one before."""
    embedder = CountingEmbedder()
    index = ImageIndex(embedder.name, embedder.dim, "ivf", IndexParams(nlist=3))
    index.add_folder(folder, embedder, progress=False)
    entries, vectors = list(index.entries), index.vectors()
    (folder / "red_circle.png").unlink()
    (folder / "blue_square.png").unlink()
    for name in ("green_circle.png", os.path.join("sub", "black_square.png")):
        _draw(folder / name, "purple", "square", size=70)
    with pytest.raises(ValueError, match="nlist=3"):
        index.add_folder(folder, embedder, progress=False)
    assert index.entries == entries
    np.testing.assert_array_equal(index.vectors(), vectors)
    index.save(tmp_path / "saved")
    assert ImageIndex.load(tmp_path / "saved").entries == entries


def test_adding_a_parent_keeps_what_a_hidden_subfolder_added(folder):
    (folder / ".keep").mkdir()
    _draw(folder / ".keep" / "kept.png", "pink", "circle")
    embedder = CountingEmbedder()
    index = ImageIndex(embedder.name, embedder.dim)
    index.add_folder(folder / ".keep", embedder, progress=False)
    report = index.add_folder(folder, embedder, progress=False)  # skips hidden folders
    assert report.removed == [] and len(index) == 5
    (folder / ".keep" / "kept.png").unlink()  # gone from disk: now it goes
    assert [os.path.basename(p) for p in index.add_folder(folder, embedder).removed] == ["kept.png"]


def test_unreadable_images_are_skipped_with_one_warning_listing_them(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    embedder = CountingEmbedder()
    index = ImageIndex(embedder.name, embedder.dim)
    with pytest.warns(UnreadableImagesWarning, match=r"skipped 2 unreadable.*broken\.png.*empty"):
        report = index.add_folder(folder, embedder, progress=False)
    assert len(index) == 4 and len(embedder.seen) == 4
    assert sorted(os.path.basename(p) for p, _ in report.skipped) == ["broken.png", "empty.jpg"]


def test_embeddings_of_another_model_or_width_are_refused(folder):
    index = ImageIndex("clip-a@123", 17)
    index.add(np.ones((1, 17), "f4"), _entries(1), model="clip-a@123")
    with pytest.raises(IndexMismatchError, match=r"model 'clip-a@123' \(width 17\).*'clip-b"):
        index.add(np.ones((1, 17), "f4"), _entries(1, "/b"), model="clip-b@456")
    with pytest.raises(IndexMismatchError, match=r"received model 'clip-a@123' \(width 8\)"):
        index.add(np.ones((1, 8), "f4"), _entries(1, "/c"), model="clip-a@123")
    embedder = CountingEmbedder(name="thumb-other")
    with pytest.raises(IndexMismatchError, match="thumb-other"):
        index.add_folder(folder, embedder, progress=False)
    assert embedder.calls == 0  # refused before any image is read
    with pytest.raises(ValueError, match="already indexed"):
        index.add(np.ones((1, 17), "f4"), _entries(1), model="clip-a@123")


# --------------------------------------------------------------------------------------------
# CLI (tiny preset: random tiny-vit CLIP from seed 0)
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_cli_build_search_add_info_on_the_tiny_preset(folder, tmp_path, capsys):
    out = tmp_path / "index"
    (folder / "broken.png").write_bytes(b"nope")
    with pytest.warns(UnreadableImagesWarning, match="broken.png"):
        rc = main(["build", str(folder), "--out", str(out), "--preset", "tiny", "--no-progress"])
    assert rc == 0
    assert "4 images (4 added" in capsys.readouterr().out
    meta = json.loads((out / META_FILE).read_text())
    assert meta["model"] == "tiny-vit@random-seed0" and meta["dim"] == 32
    assert meta["metadata"]["embedder"] == {"preset": "tiny", "clip": None}

    # Image query: the image itself comes first, at cosine ~1 (the same CLIP, rebuilt from seed 0).
    query = folder / "green_circle.png"
    assert main(["search", str(out), "--image", str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == str(query.resolve())
    assert hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3]

    assert main(["search", str(out), "--text", "a red circle", "-k", "10", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4  # k > size: every image once
    assert {os.path.basename(h["path"]) for h in hits} == {
        "red_circle.png",
        "blue_square.png",
        "green_circle.png",
        "black_square.png",
    }
    assert all(-1 <= h["score"] <= 1 for h in hits)

    _draw(folder / "new.png", "orange", "circle")
    with pytest.warns(UnreadableImagesWarning):
        assert main(["add", str(out), str(folder), "--no-progress"]) == 0
    assert "5 images (1 added, 0 updated, 0 removed, 4 unchanged" in capsys.readouterr().out

    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == 5 and info["kind"] == "exact"

    # Errors are one clear line and exit status 2.
    assert main(["build", str(folder), "--out", str(out), "--preset", "tiny"]) == 2
    assert "already holds an index" in capsys.readouterr().err
    bad = [
        (["build", str(folder), "--out", str(tmp_path / "ivf"), "--preset", "tiny", "--kind",
          "ivf", "--nlist", "100"], "nlist=100"),
        (["search", str(out), "--text", "x", "-k", "0"], "k must be >= 1"),
        (["build", str(folder), "--out", str(tmp_path / "p"), "--preset", "nosuch"], "nosuch"),
        (["build", str(folder), "--out", str(tmp_path / "c"), "--clip", str(folder)], str(folder)),
    ]  # fmt: skip
    for argv, says in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err  # the model's loading messages, then one line
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and says in last and "Traceback" not in err
    faiss_file = next(out.glob("vectors-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated: info does not verify
    assert main(["info", str(out)]) == 2
    assert "FAISS cannot read it" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "--text", "x"]) == 2
    assert "no image index here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "build" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# bench.retrieval_index
# --------------------------------------------------------------------------------------------


def test_retrieval_bench_reports_every_kind_side_by_side(tmp_path):
    argv = ["--sizes", "3000", "--dims", "16", "--clusters", "30", "--queries", "64"]
    argv += ["--repeats", "4", "--nprobe", "2", "8", "--ef-search", "16", "--no-progress"]
    result = retrieval_index.main([*argv, "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"] == result["rows"]
    kinds = [(r["kind"], r["param"]) for r in result["rows"]]
    assert kinds[0] == ("exact", "-") and [k for k, _ in kinds] == ["exact", "ivf", "ivf", "hnsw"]
    exact, ivf2, ivf8 = result["rows"][:3]
    assert exact["recall_at_10"] == 1.0
    assert 0 < ivf2["recall_at_10"] <= ivf8["recall_at_10"] <= 1
    assert all(r["ms_per_query_b1"] > 0 and r["ms_per_query_b32"] > 0 for r in result["rows"])


def test_an_index_that_holds_its_images_can_be_moved(folder, tmp_path):
    import shutil

    embedder = CountingEmbedder()
    home = tmp_path / "home"
    shutil.copytree(folder, home / "images")
    outside = tmp_path / "outside.png"
    _draw(outside, "red", "square")
    index = ImageIndex(embedder.name, embedder.dim)
    index.add_folder(home / "images", embedder, progress=False)
    index.add(embedder([Image.open(outside)]), [str(outside)], model=embedder.name)
    index.save(home)
    saved = json.loads((home / "index.json").read_text())["entries"]
    inside = sorted(e["path"] for e in saved if not os.path.isabs(e["path"]))
    expected = sorted(p.relative_to(home).as_posix() for p in (home / "images").rglob("*.png"))
    assert inside == expected and len(inside) >= 4
    assert str(outside.resolve()) in [e["path"] for e in saved]  # outside: absolute
    moved = tmp_path / "elsewhere" / "index"
    shutil.move(home, moved)
    loaded = ImageIndex.load(moved)
    target = moved / inside[0]
    hit = loaded.search(embedder([Image.open(target)]), 1).paths[0][0]
    assert hit == str(target.resolve())
    assert Path(hit).is_file()
