"""The shapes world as training data for the demo recipe (cm3leon.train.DemoData).

`cm3eval train demo` trains on the default world's train split (images rendered in memory, VQA
answers by annotator majority, every edit turn), plus more train-split scenes used only as
text->image examples; the val split feeds the recipe's quick sanity check.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from cm3leon.train.recipe import DemoData, DemoEdit, DemoImage

from ..prompts import majority_answer

from .world import ShapeScene, World, WorldConfig, generate_world, render


def demo_data(world: World, split: str = "train") -> DemoData:
    """A shapes-world split as in-memory training data (images rendered, answers by majority)."""
    ws, size = world.splits[split], world.config.image_size
    questions: dict[int, list[tuple[str, str]]] = {}
    for q in ws.questions:
        questions.setdefault(q.image_id, []).append((q.question, majority_answer(q.answers, q.answer)))
    images = [DemoImage(str(im.image_id), render(im.scene, size), list(im.captions), questions.get(im.image_id, []))
              for im in ws.images]
    cache: dict[ShapeScene, Image.Image] = {}

    def rendered(scene: ShapeScene) -> Image.Image:  # an edit's source is usually a split image: render it once
        if scene not in cache:
            cache[scene] = render(scene, size)
        return cache[scene]

    edits = [DemoEdit(t.instruction, rendered(t.source), rendered(t.target)) for es in ws.edits for t in es.turns]
    return DemoData(images, edits)


def t2i_extra_scenes(config: WorldConfig, n: int) -> list[DemoImage]:
    """The n train-split scenes after the world's own (config.n_train of them), captions only.

    A split's i-th scene depends on (seed, split, i) alone, so these extend the same train split
    and never hold a val/test scene (the world reserves those by scene hash)."""
    if n <= 0:
        return []
    big = generate_world(dataclasses.replace(config, n_train=config.n_train + n, n_val=0, n_test=0,
                                             questions_per_image=0, edit_fraction=0.0))
    return [DemoImage(str(im.image_id), render(im.scene, config.image_size), list(im.captions))
            for im in big.splits["train"].images[config.n_train:]]
