"""Check a folder of your own images before training on it: every bad record, with its line.

    python -m data.validate my_photos                      # metadata.jsonl rows for train.vlm
    python -m data.validate my_photos --kind captions      # rows for train.clip / train.diffusion
    python -m data.validate my_photos --json report.json   # the report as JSON too

An imagefolder is ``<folder>/metadata.jsonl`` with one JSON object per line whose ``file_name``
is an image inside the folder (data.formats). A record is bad when its line is not a JSON object,
its file is missing, outside the folder or not an image we can read (core.images.load_rgb: size
and type bounded), or it has no text to learn from: no non-empty ``captions`` for ``--kind
captions``; no ``captions``, ``dialogues`` or ``qa`` for ``--kind chat`` (data.conversations).
Every bad record is reported with its line number, then the command exits with status 1.

The training scripts that read imagefolders call the same check (``--bad-records stop``, the
default: stop before training, listing them all; ``--bad-records skip``: train on the good rows,
warning with the list).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from core.images import ImageError, load_rgb
from core.io import atomic_write_text
from data.conversations import record_from_row
from data.formats import FormatError, imagefolder_lines, parse_imagefolder_line, row_captions

__all__ = [
    "BAD_RECORDS",
    "BadRecord",
    "ImagefolderReport",
    "OnBad",
    "add_bad_records_argument",
    "check_imagefolder",
    "main",
    "usable_rows",
]

BAD_RECORDS = ("stop", "skip")  # what a training script does with bad records
OnBad = Literal["stop", "skip"]
Kind = Literal["chat", "captions"]


@dataclass
class BadRecord:
    line: int
    file_name: str | None
    problem: str


@dataclass
class ImagefolderReport:
    """The rows that passed (line number, row), and every bad one."""

    path: Path
    good: list[tuple[int, dict[str, Any]]]
    bad: list[BadRecord]

    def describe(self, limit: int | None = 20) -> str:
        lines = [f"{self.path}: {len(self.good)} good records, {len(self.bad)} bad"]
        shown = self.bad if limit is None else self.bad[:limit]
        for b in shown:
            lines.append(f"  line {b.line}" + (f" ({b.file_name})" if b.file_name else "") + f": "
                         f"{b.problem}")  # fmt: skip
        if len(shown) < len(self.bad):
            lines.append(f"  ... and {len(self.bad) - len(shown)} more")
        return "\n".join(lines)


def _caption_text(row: dict[str, Any]) -> None:
    row_captions(row, "")


def _file_name(line: str) -> str | None:
    """The line's "file_name" for the report, when it has one, whatever else is wrong with it."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    name = row.get("file_name") if isinstance(row, dict) else None
    return name if isinstance(name, str) else None


def check_imagefolder(
    folder: str | Path,
    kind: Kind = "chat",
    *,
    check_images: bool = True,
    progress: bool = True,
) -> ImagefolderReport:
    """Every record of ``folder/metadata.jsonl`` checked (module docstring); nothing raised for a
    bad record. FileNotFoundError when there is no metadata.jsonl."""
    folder = Path(folder)
    path, lines = imagefolder_lines(folder)
    root = folder.resolve()
    text_check: Callable[[dict[str, Any]], object] = (
        _caption_text if kind == "captions" else lambda row: record_from_row(row, folder, "")
    )
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadRecord] = []
    for n, line in tqdm(lines, desc=f"check {path.name}", unit="record", disable=not progress):
        name = _file_name(line)
        try:
            row = parse_imagefolder_line(line, root, "")
            name = str(row["file_name"])
            text_check(row)
            if check_images:
                load_rgb(folder / name)
        except (FormatError, ImageError) as err:
            problem = str(err).lstrip(": ")
            if name and problem.startswith(str(folder / name)):  # the path is in the report
                problem = problem[len(str(folder / name)) :].lstrip(": ")
            bad.append(BadRecord(n, name, problem))
            continue
        good.append((n, row))
    return ImagefolderReport(path, good, bad)


def usable_rows(
    folder: str | Path, kind: Kind, on_bad: OnBad, *, progress: bool = True
) -> list[dict[str, Any]]:
    """The rows to train on: all of them when every record is good; with bad records, FormatError
    listing them all (``on_bad="stop"``) or the good ones with a warning listing the bad
    (``"skip"``; FormatError if none is good)."""
    if on_bad not in BAD_RECORDS:
        raise ValueError(f"on_bad must be one of {BAD_RECORDS}, received {on_bad!r}")
    report = check_imagefolder(folder, kind, progress=progress)
    if report.bad and on_bad == "stop":
        raise FormatError(
            report.describe() + "\nfix them, or pass --bad-records skip to use the rest"
        )
    if report.bad:
        if not report.good:
            raise FormatError(report.describe() + "\nno good record left to use")
        warnings.warn("skipping bad records:\n" + report.describe(), stacklevel=2)
    return [row for _, row in report.good]


def add_bad_records_argument(group: Any) -> None:
    """The training scripts' ``--bad-records stop|skip`` (with --imagefolder)."""
    group.add_argument(
        "--bad-records",
        choices=BAD_RECORDS,
        default="stop",
        help="with --imagefolder: every record is checked first (file, image, text); stop listing "
        "the bad ones (default) or skip them (python -m data.validate FOLDER shows the same)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="an imagefolder (with metadata.jsonl)")
    parser.add_argument(
        "--kind",
        choices=["chat", "captions"],
        default="chat",
        help="chat: captions, dialogues or qa (train.vlm); captions (train.clip, train.diffusion)",
    )
    parser.add_argument("--no-images", action="store_true", help="do not open the images (faster)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = check_imagefolder(
            args.folder, args.kind, check_images=not args.no_images, progress=not args.no_progress
        )
    except (FileNotFoundError, FormatError) as err:
        parser.error(str(err))
    print(report.describe(limit=None))
    if args.json is not None:
        doc = {
            "metadata": str(report.path),
            "kind": args.kind,
            "good": len(report.good),
            "bad": [asdict(b) for b in report.bad],
        }
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
    return 1 if report.bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
