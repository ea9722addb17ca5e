"""The preset config: one JSON file in configs/ made of the components' own sub-configs.

    cfg = PolychromeConfig.from_preset("shapes")   # configs/shapes.json
    cfg.llm.source                                 # "smollm2-135m-instruct"

Each sub-config is defined beside the component it configures (STYLE.md 3) and validated there;
later issues add theirs (vision, generation, segmentation, STAMP) as new fields here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import Config, config_from_dict, load_preset_dict, preset_path, project_path
from data.shapeworld import ShapeWorldConfig
from generation.diffusion import DiffusionPresetConfig
from generation.gill import GILLPresetConfig
from lm.loading import LLMConfig
from segmentation.open_vocab import OpenVocabPresetConfig
from segmentation.stamp import StampPresetConfig
from vision.clip import ClipPresetConfig
from vision.sam import SamPresetConfig
from vlm.model import VLMPresetConfig

__all__ = ["PolychromeConfig", "TextEncoderConfig"]


@dataclass
class TextEncoderConfig(Config):
    """The frozen sentence encoder (CLIP's text tower and the diffusion decoder's conditioning)."""

    source: str = "minilm-l6"  # a model source spec (core.sources)
    max_length: int = 32  # tokens kept per caption

    def __post_init__(self) -> None:
        if not 4 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [4, 512], received {self.max_length}")


@dataclass
class PolychromeConfig(Config):
    """Everything a preset fixes. Saved beside every checkpoint that depends on it."""

    name: str  # the preset's name
    kind: Literal["tiny", "shapes", "paper"]  # which family of weights the preset uses
    description: str = ""  # one line for --help and model cards
    llm: LLMConfig = field(default_factory=LLMConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    shapeworld: ShapeWorldConfig = field(default_factory=ShapeWorldConfig)
    clip: ClipPresetConfig = field(default_factory=ClipPresetConfig)
    sam: SamPresetConfig = field(default_factory=SamPresetConfig)
    diffusion: DiffusionPresetConfig = field(default_factory=DiffusionPresetConfig)
    vlm: VLMPresetConfig = field(default_factory=VLMPresetConfig)
    stamp: StampPresetConfig = field(default_factory=StampPresetConfig)
    gill: GILLPresetConfig = field(default_factory=GILLPresetConfig)
    open_vocab: OpenVocabPresetConfig = field(default_factory=OpenVocabPresetConfig)

    @classmethod
    def from_preset(cls, name: str) -> PolychromeConfig:
        """Load and validate configs/<name>.json; ValueError listing the presets if unknown."""
        return config_from_dict(cls, load_preset_dict(name), source=str(preset_path(name)))

    def vision_checkpoints(
        self, clip: Path | None = None, sam: Path | None = None
    ) -> tuple[Path, Path]:
        """(CLIP, SAM) checkpoint folders: the given ones, else this preset's (resolved in the
        project). ValueError when neither is set."""
        clip = clip or (project_path(self.clip.checkpoint) if self.clip.checkpoint else None)
        sam = sam or (project_path(self.sam.checkpoint) if self.sam.checkpoint else None)
        if clip is None or sam is None:
            raise ValueError("the preset has no CLIP or SAM checkpoint: pass --clip and --sam")
        return clip, sam
