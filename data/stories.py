"""ShapeWorld stories: GILL's VIST-style contextual generation, on scenes we can render and judge.

VIST (Huang et al. 2016) stories are five captioned photos; GILL (Koh et al. 2023, Sec. 4.1) is
given the first four images with the five captions and generates the fifth image, and reports
that this context beats the fifth caption alone. A VIST story's last sentence often leans on
what came before ("They had a great time."): the words alone do not say what to draw.

A ShapeWorld story carries that dependence and nothing else. Its target is a held-out scene of
one or two objects (the diffusion decoder's kind); its four context panels are other scenes of
the split, each showing one of the target's objects (same colour and class), with their own
captions; its fifth caption names the objects by class only ("The circle again.", "The circle
and the star again."). Which colours to draw is in the context, not in the last caption.

    stories = make_stories("out/shapeworld_diffusion", "val", n=100, seed=0)

A pure function of (root, split, n, seed). Targets are taken in image order; a target is skipped
when the split holds no other scene for one of its objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.datasets import InstanceDataset, shapeworld_paths
from data.formats import read_coco_captions
from data.language import listing_caption

__all__ = ["CONTEXT_PANELS", "Story", "last_caption", "make_stories"]

CONTEXT_PANELS = 4  # VIST: five panels, the fifth generated


@dataclass(frozen=True)
class Story:
    """Four captioned panels, then the caption of the fifth and the scene it should show."""

    context: tuple[tuple[Path, str], ...]  # (image, its caption) x CONTEXT_PANELS
    last: str  # the fifth caption: the objects by class only
    target: Path  # the held-out fifth scene
    target_caption: str  # its own caption, naming every object by colour and class
    objects: tuple[tuple[str, str], ...]  # (colour, class) of the target's objects


def last_caption(objects: tuple[tuple[str, str], ...]) -> str:
    """The fifth caption: the target's objects by class only ("The circle and the star again.")."""
    names = " and ".join(f"the {shape}" for _, shape in objects)
    return f"{names[0].upper()}{names[1:]} again."


def make_stories(root: str | os.PathLike[str], split: str, n: int, seed: int = 0) -> list[Story]:
    """Up to `n` stories over the one- and two-object scenes of a ShapeWorld split (module
    docstring). Context panels prefer scenes of the object alone, then any scene holding it; for
    two objects they alternate between them."""
    if n < 1:
        raise ValueError(f"n must be >= 1, received {n}")
    paths = shapeworld_paths(root, split)
    inst = InstanceDataset.from_shapeworld(root, split)
    captions: dict[int, list[str]] = {}
    for cap in read_coco_captions(paths["captions"]).captions:
        captions.setdefault(cap.image_id, []).append(cap.caption)
    objects = [
        tuple((str(a.extra.get("colour")), inst.category_names[a.category_id]) for a in anns)
        for anns in inst.annotations
    ]
    holding: dict[tuple[str, str], list[int]] = {}
    for i, objs in enumerate(objects):
        for obj in set(objs):
            holding.setdefault(obj, []).append(i)
    rng = np.random.default_rng(seed)
    stories: list[Story] = []
    for t, objs in enumerate(objects):
        if len(stories) >= n:
            break
        distinct = tuple(dict.fromkeys(objs))
        if not 1 <= len(objs) <= 2 or len(distinct) != len(objs):
            continue  # the decoder's kind: one or two objects, told apart by colour or class
        pools = []
        for obj in distinct:
            others = [i for i in holding[obj] if i != t]
            alone = [i for i in others if len(objects[i]) == 1]
            pools.append((alone, [i for i in others if len(objects[i]) > 1]))
        if any(not alone and not rest for alone, rest in pools):
            continue
        panels: list[int] = []
        for k in range(CONTEXT_PANELS):
            alone, rest = pools[k % len(pools)]
            unused = [i for i in alone if i not in panels] or [i for i in rest if i not in panels]
            pool = unused or alone or rest  # reuse a panel only when the split has no other
            panels.append(pool[int(rng.integers(len(pool)))])
        context = tuple(
            (
                inst.images_root / inst.file_names[i],
                listing_caption(captions[inst.image_ids[i]], objects[i]),
            )
            for i in panels
        )
        stories.append(
            Story(
                context,
                last_caption(distinct),
                inst.images_root / inst.file_names[t],
                listing_caption(captions[inst.image_ids[t]], objs),
                distinct,
            )
        )
    return stories
