"""Screenshots of every flow of the demo, on a preset's real models, for the README.

    python -m bench.app_screenshots                      # shapes preset -> docs/screenshots/
    python -m bench.app_screenshots --preset tiny --out /tmp/shots

Not a benchmark: it starts ``python app.py --preset ...`` (bench.serve) and drives it in
headless Chromium (Playwright; Debian's ``chromium`` or POLYCHROME_CHROMIUM), as a person would:
a question about
an image, a segmentation request, an image request (retrieved, then generated), the segment
everything and open-vocabulary tabs, and a sketch sent to the chat. One PNG per flow; the flows a
preset cannot serve are skipped with a note. The tests drive the same flows on the tiny preset
(tests/test_app_browser.py, test_stamp_app.py, test_app_tools.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.serve import serve_app
from core.config import project_path
from vlm.config import PolychromeConfig
from vlm.examples import example_images

TIMEOUT_MS = 180_000  # a reply on a busy 2-core machine


def chromium_page(url: str) -> Iterator[Any]:
    """A headless Chromium page (Playwright) open at `url`; yields it, closes the browser after.

    Needs Debian's ``chromium`` (installed by .ci/run) or POLYCHROME_CHROMIUM set to a
    Chromium/Chrome executable."""
    from playwright.sync_api import sync_playwright

    path = os.environ.get("POLYCHROME_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise RuntimeError(
            "no Chromium found: install Debian's chromium (`apt-get install chromium`, as .ci/run "
            "does) or set POLYCHROME_CHROMIUM to a Chromium executable"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_selector("textarea", timeout=60_000)
        try:
            yield page
        finally:
            browser.close()


def _send(page: Any, text: str, files: Sequence[str] = ()) -> None:
    pictures = "[data-testid='user'] img"
    shown = page.locator(pictures).count()
    if files:
        page.locator("input[type=file]").first.set_input_files(files)
        page.wait_for_timeout(1500)  # the upload lands before the message is sent
    box = page.locator("textarea").first
    box.fill(text)
    box.press("Enter")
    if files:  # the message went out with its picture
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length > n",
            arg=[pictures, shown],
            timeout=60_000,
        )


def _wait_idle(page: Any) -> None:
    """Until the last bot message has stopped changing (streaming is over) for ~2 s."""
    bot = page.locator("[data-testid='bot']")
    last, same = None, 0
    for _ in range(TIMEOUT_MS // 700):
        shown = bot.last.inner_html() if bot.count() else ""
        same = same + 1 if shown == last else 0
        if same >= 3 and shown:
            page.wait_for_function(  # and every picture in the replies has loaded
                "() => [...document.querySelectorAll(\"[data-testid='bot'] img\")]"
                ".every(i => i.complete && i.naturalWidth > 0)",
                timeout=60_000,
            )
            return
        last = shown
        page.wait_for_timeout(700)


def _clear(page: Any) -> None:
    """A new conversation: the page reloaded (a new session)."""
    page.reload()
    page.wait_for_selector("textarea", timeout=60_000)
    page.wait_for_timeout(500)


def chat_flows(page: Any, cfg: PolychromeConfig, scene: str, out: Path) -> list[str]:
    flows = [("01-image-question.png", "Describe the image.", [scene])]
    if cfg.stamp.checkpoint:
        flows.append(("02-segment.png", "Segment the largest red shape.", [scene]))
    if cfg.gill.checkpoint:
        # a scene described as the index's captions are: the decision head retrieves
        scene_text = (
            "Show me this: The image shows a red circle, a green hexagon and an orange diamond."
        )
        flows.append(("03-retrieve.png", scene_text, []))
        flows.append(("04-generate.png", "generate: A white arrow.", []))
    written = []
    for name, text, files in tqdm(flows, desc="chat flows"):
        _clear(page)
        _send(page, text, files)
        page.locator("[data-testid='bot']").first.wait_for(timeout=TIMEOUT_MS)
        _wait_idle(page)
        page.screenshot(path=str(out / name), full_page=True)
        written.append(name)
    return written


def tool_flows(page: Any, scene: str, out: Path) -> list[str]:
    page.get_by_role("tab", name="Segment everything").click()
    page.locator("input[type=file]").nth(1).set_input_files([scene])
    page.get_by_role("button", name="Segment everything").click()
    page.get_by_text("masks found").wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(out / "05-segment-everything.png"), full_page=True)
    page.get_by_role("tab", name="Open-vocabulary segmentation").click()
    page.locator("input[type=file]").nth(2).set_input_files([scene])
    page.get_by_label("Vocabulary").fill("circle, square, triangle, star, hexagon, diamond, arrow")
    page.get_by_role("button", name="Segment", exact=True).click()
    page.get_by_text("found:").wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(out / "06-open-vocabulary.png"), full_page=True)
    return ["05-segment-everything.png", "06-open-vocabulary.png"]


def sketch_flow(page: Any, out: Path) -> list[str]:
    _clear(page)
    page.get_by_role("tab", name="Sketch").click()
    page.get_by_role("button", name="Brush").click()
    canvas = page.locator("canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 50, cy - 40)  # a triangle
    page.mouse.down()
    for x, y in ((cx + 50, cy - 40), (cx, cy + 50), (cx - 50, cy - 40)):
        page.mouse.move(x, y, steps=12)
    page.mouse.up()
    page.get_by_label("Question about the sketch").fill("What shape did I draw?")
    page.get_by_role("button", name="Send to chat").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('draw'))",
        timeout=60_000,
    )
    page.wait_for_timeout(1500)  # the drawing's upload lands before the message is sent
    box = page.locator("textarea").first
    box.click()
    box.press("Enter")
    page.locator("[data-testid='bot']").first.wait_for(timeout=TIMEOUT_MS)
    _wait_idle(page)
    page.screenshot(path=str(out / "07-sketch-in-chat.png"), full_page=True)
    return ["07-sketch-in-chat.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.app_screenshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="shapes", help="preset the demo loads")
    parser.add_argument("--out", type=Path, default=project_path("docs/screenshots"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = PolychromeConfig.from_preset(args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    scene = str(example_images(cfg.shapeworld)["shapes-1"])
    written: list[str] = []
    with serve_app(["--preset", args.preset]) as url:
        for page in chromium_page(url):
            try:
                written += chat_flows(page, cfg, scene, args.out)
                written += tool_flows(page, scene, args.out)
                written += sketch_flow(page, args.out)
            except Exception:
                page.screenshot(path=str(args.out / "failed.png"), full_page=True)
                print(f"a flow failed; the page as it was: {args.out / 'failed.png'}")
                raise
    for name in written:
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
