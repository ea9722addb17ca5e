"""Test-wide setup: offline hub, a private cache dir, seeded RNGs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_CACHE = tempfile.mkdtemp(prefix="polychrome-test-cache-")
os.environ["POLYCHROME_CACHE"] = _CACHE

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module with one intra-op thread. Tiny models gain nothing from more, and on a shared
    2-core machine OpenMP spin-waiting under oversubscription made them up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stories_world(tmp_path_factory) -> Path:
    """The diffusion decoder's kind of data, read-only: 64 px scenes of one or two objects, 40 val
    images (data/stories.py makes 8 stories of them)."""
    from data.shapeworld import LayoutConfig, ShapeWorldConfig, SplitSizes, generate

    root = tmp_path_factory.mktemp("stories") / "world"
    cfg = ShapeWorldConfig(
        seed=0,
        layout=LayoutConfig(image_size=64, min_objects=1, max_objects=2, min_size=0.08),
        splits=SplitSizes(train=0, val=40, test=0, pretrain=0),
    )
    generate(root, cfg, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer) of the tiny random Llama, frozen, built once per session."""
    from lm.loading import load_causal_lm

    return load_causal_lm("tiny-random-llama", frozen=True)


def sharpened_tiny_vlm():
    """The tiny preset's VLM (seed 0) with its LLM's matrices scaled x25.

    The random tiny LLM's greedy replies are all newlines whatever the prompt; sharpened, they are
    distinct strings that depend on the prompt and the image. (Sampling from its near-uniform
    distributions instead flipped tokens between runs.)
    """
    from vlm.config import PolychromeConfig
    from vlm.model import PolychromeVLM, VLMConfig

    cfg = PolychromeConfig.from_preset("tiny")
    torch.manual_seed(0)
    vlm = PolychromeVLM.build(VLMConfig(llm=cfg.llm, vision=cfg.clip, projector=cfg.vlm.projector))
    with torch.no_grad():
        for p in vlm.llm.parameters():
            if p.ndim == 2:
                p.mul_(25)
    return vlm


@pytest.fixture(scope="module")
def sharp_vlm():
    """sharpened_tiny_vlm(), once per module."""
    return sharpened_tiny_vlm()


def image_lora_last_hidden(core, input_ids, attention_mask, visual):
    """The reference an extension's prefix must match on a core with an image LoRA: the core's
    own forward over the prompt with the LoRA on, last position (B, H)."""
    with torch.no_grad(), core.image_lora():
        hidden = core.llm.base_model(
            inputs_embeds=core.embed(input_ids, visual), attention_mask=attention_mask
        ).last_hidden_state
    return hidden[:, -1]


def tiny_autoencoder_kl():
    """An SD-style AutoencoderKL of diffusers' get_dummy_components sizes (factor 2, 4 latent
    channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
    )


def drain_across_threads(items):
    """Every item of the generator `items`, resumed in turn by two worker threads: gradio
    resumes a streamed reply on whichever worker thread is free, and grad / inference mode is
    per thread (a reply that held ``torch.inference_mode`` across its yields failed there, and
    left the thread that started it in inference mode). Fails if a worker's mode changed."""
    from concurrent.futures import ThreadPoolExecutor
    from itertools import count

    def modes() -> tuple[bool, bool]:
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    workers = [ThreadPoolExecutor(max_workers=1) for _ in range(2)]
    try:
        before = [w.submit(modes).result() for w in workers]
        out: list = []
        for turn in count():
            try:
                out.append(workers[turn % 2].submit(next, items).result())
            except StopIteration:
                break
        assert [w.submit(modes).result() for w in workers] == before, "a worker's mode leaked"
        return out
    finally:
        for w in workers:
            w.shutdown()


def serve_demo(assistant, tools=None):
    """Serve the demo over `assistant` (and `tools`, a VisionTools) on a free local port; yields
    the URL, closes afterwards."""
    import socket

    import app
    from vlm.config import PolychromeConfig

    demo = app.build_demo(assistant, PolychromeConfig.from_preset("tiny"), tools=tools)
    demo.queue(max_size=8)
    for attempt in range(3):  # another process may take the free port before gradio binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            demo.launch(
                server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
            )
            break
        except OSError:
            if attempt == 2:
                raise
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def chromium_page(url):
    """A headless Chromium page (Playwright) open at `url` (bench.app_screenshots'); fails the
    test with the install hint when no Chromium is found."""
    from bench.app_screenshots import chromium_page as open_page

    try:
        yield from open_page(url)
    except RuntimeError as err:
        if "no Chromium found" not in str(err):
            raise
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def demo_server():
    """The demo on the sharpened tiny VLM, served on a free local port: (assistant, url).

    Replies are greedy and at most 8 tokens long.
    """
    from vlm.assistant import Assistant, SamplingSettings

    vlm = sharpened_tiny_vlm()
    settings = SamplingSettings(max_new_tokens=8)
    assistant = Assistant(vlm.llm, vlm.tokenizer, vlm=vlm, default_settings=settings)
    for url in serve_demo(assistant):
        yield assistant, url


def launch_two_processes(
    module: str, argv: list[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`python -m module argv` as 2 CPU processes under accelerate launch (its torchrun launcher,
    gloo on a machine without GPUs; port 0: a free one, as other runs may hold 29500), one
    thread each. With `check`, a failed run fails the test with the end of its stderr."""
    root = Path(__file__).resolve().parents[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(launch, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run
