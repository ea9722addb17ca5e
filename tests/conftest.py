"""Test-wide setup: offline hub, a private cache dir, seeded RNGs."""

from __future__ import annotations

import os
import shutil
import tempfile

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
def tiny_lm():
    """(model, tokenizer) of the tiny random Llama, frozen, built once per session."""
    from lm.loading import load_causal_lm

    return load_causal_lm("tiny-random-llama", frozen=True)
