"""The embedded demo's data: the procedurally rendered "shapes" world and its training data.

world.py     the world itself (scenes, captions, VQA, edits) and its writer in the official COCO /
             VQAv2 / MagicBrush layouts; `demo_world_root(cache_dir)` is the built-in demo tasks'
             data root, written on first use
extras.py    the files of the dialog, paragraph and text-rendering demo tasks (VisDial, Stanford
             paragraphs and MARIO-Eval layouts)
training.py  the world as cm3leon.train.DemoData for the demo recipe (`cm3eval train demo`)
__main__.py  `python -m tasks.shapes ROOT [--seed N]`: write the default world, print its stats

The training names load on first access, so importing the world does not import torch.
"""

from __future__ import annotations

from typing import Any

from .world import (BACKGROUNDS, COLORS, EDIT_TYPES, EVAL_WORLD, GENERATOR_VERSION, KINDS, QUESTION_FAMILIES,
                    SIZES, SPLITS, EditSession, EditTurn, Shape, ShapeScene, VQAItem, World, WorldConfig,
                    WorldFolderError, WorldImage, WorldSplit, caption_tokens, demo_world_root, ensure_world,
                    generate_world, position_name, render, scene_caption, shape_mask, vocabulary, world_paths,
                    world_stats, write_world)
from . import extras  # noqa: E402,F401  (registers the dialog / paragraph / text-prompt files of the world)

_TRAINING = ("demo_data", "t2i_extra_scenes")

__all__ = [
    "BACKGROUNDS", "COLORS", "EDIT_TYPES", "EVAL_WORLD", "GENERATOR_VERSION", "KINDS", "QUESTION_FAMILIES", "SIZES",
    "SPLITS", "EditSession", "EditTurn", "Shape", "ShapeScene", "VQAItem", "World", "WorldConfig", "WorldFolderError",
    "WorldImage", "WorldSplit", "caption_tokens", "demo_world_root", "ensure_world", "generate_world",
    "position_name", "render", "scene_caption", "shape_mask", "vocabulary", "world_paths", "world_stats",
    "write_world", *_TRAINING,
]


def __getattr__(name: str) -> Any:
    # training.py imports cm3leon.train (torch); load it only when one of its names is asked for
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
