"""Checkpoints: safetensors files plus a manifest (config, sha256 and size per file).

Layout of a checkpoint folder::

    manifest.json        {"format": "polychrome-checkpoint", "version": 1, "config": {...},
                          "files": {"model.safetensors": {"sha256": "...", "bytes": 123}},
                          "metadata": {...}}
    model.safetensors    one or more tensor files, named by the caller

The folder is written atomically (a temporary sibling renamed into place), and loading verifies
every file's size and sha256 against the manifest before reading a byte of it as tensors, so a
corrupted or truncated file raises :class:`CheckpointError` naming the file and the expected hash.
Checkpoints hold only the tensors a stage trained; frozen parts are named by their source in the
config instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.io import atomic_dir, atomic_write_text, sha256_file

__all__ = [
    "MANIFEST_NAME",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_config",
    "checkpoint_metadata",
    "load_checkpoint",
    "load_module",
    "load_state_strict",
    "save_checkpoint",
    "save_module",
    "verify_checkpoint",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "polychrome-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupted or does not fit the model."""


@dataclass
class Checkpoint:
    """What load_checkpoint returns: tensors per file stem, the saved config and metadata."""

    tensors: dict[str, dict[str, torch.Tensor]]  # file stem ("model") -> state dict
    config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` (file stem -> state dict) as <stem>.safetensors with a manifest.

    Tensors are made contiguous and copied to CPU; shared storage is cloned (safetensors refuses
    aliased tensors). Returns the checkpoint folder.
    """
    directory = Path(directory)
    if not tensors:
        raise CheckpointError(f"{directory}: nothing to save (no tensor files given)")
    files: dict[str, dict[str, Any]] = {}
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        for stem, state in tensors.items():
            if not stem or "/" in stem or stem.startswith("."):
                raise CheckpointError(f"invalid tensor file stem {stem!r}")
            flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            name = f"{stem}.safetensors"
            save_file(flat, str(tmp / name), metadata={"format": "pt"})
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "config": dict(config),
            "files": files,
            "metadata": dict(metadata or {}),
        }
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return directory


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    if not path.is_file():
        raise CheckpointError(
            f"{path}: manifest not found; is {directory} a Polychrome checkpoint?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, received {manifest!r:.200}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: expected manifest version {VERSION}, received {manifest.get('version')!r}"
        )
    for key, tp in (("config", dict), ("files", dict), ("metadata", dict)):
        if not isinstance(manifest.get(key), tp):
            raise CheckpointError(f"{path}: field '{key}' must be an object")
    return manifest


def checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's config, from its manifest alone (no file is hashed or read)."""
    return dict(_read_manifest(Path(directory))["config"])


def checkpoint_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's metadata, from its manifest alone (no file is hashed or read)."""
    return dict(_read_manifest(Path(directory))["metadata"])


def verify_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file's size and sha256 against the manifest; return the manifest."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file listed in the manifest is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"{path}: expected {info['bytes']} bytes (sha256 {info['sha256']}), found {size}; "
                "the file is truncated or was replaced"
            )
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 mismatch: expected {info['sha256']}, computed {digest}; "
                "the file is corrupted"
            )
    return manifest


def load_checkpoint(
    directory: str | os.PathLike[str], *, verify: bool = True, device: str = "cpu"
) -> Checkpoint:
    """Read a checkpoint folder written by save_checkpoint, verifying hashes first."""
    directory = Path(directory)
    manifest = verify_checkpoint(directory) if verify else _read_manifest(directory)
    tensors = {}
    for name in manifest["files"]:
        try:
            tensors[name.removesuffix(".safetensors")] = load_file(str(directory / name), device)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{directory / name}: cannot read safetensors ({err})") from None
    return Checkpoint(tensors, manifest["config"], manifest["metadata"], directory)


def load_state_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint"
) -> None:
    """load_state_dict(strict=True) with an error that lists missing and unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not fit {type(module).__name__}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{what}: tensor {key!r} expected shape {tuple(own[key].shape)}, "
                f"received {tuple(value.shape)}"
            )
    module.load_state_dict(dict(state), strict=True)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def save_module(
    directory: str | os.PathLike[str],
    stem: str,
    module: torch.nn.Module,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """One module's whole state dict as ``<stem>.safetensors`` in fp16 (floating tensors only),
    with its config in the manifest: the layout of the small heads we train."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    return save_checkpoint(directory, {stem: state}, config, metadata, overwrite=overwrite)


def load_module(
    directory: str | os.PathLike[str], stem: str, build: Callable[[dict[str, Any]], ModuleT]
) -> ModuleT:
    """What ``save_module`` wrote: ``build(config)`` makes the module, the tensors load strictly
    (sha256 checked) in the module's own dtypes; returned in eval mode."""
    ckpt = load_checkpoint(directory)
    if stem not in ckpt.tensors:
        raise CheckpointError(
            f"{directory}: expected {stem}.safetensors, found {sorted(ckpt.tensors)}"
        )
    module = build(ckpt.config)
    own = module.state_dict()
    state = {
        k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
        for k, v in ckpt.tensors[stem].items()
    }
    load_state_strict(module, state, what=f"{stem} checkpoint {directory}")
    return module.eval()
