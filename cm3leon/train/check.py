"""A quick sanity evaluation of a freshly built model (not the harness's metrics)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import ModelBundle
from ..document import DocumentCodec
from ..sampling import GenerationRequest, Sampler, SamplingConfig
from ..vq import preprocess
from .recipe import DemoImage, DemoRecipe


def _words(s: str) -> list[str]:
    return [w for w in "".join(c if c.isalnum() else " " for c in s.lower()).split()]


def _word_f1(pred: str, ref: str) -> float:
    p, r = _words(pred), _words(ref)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    return 0.0 if not common else 2 * common / (len(p) + len(r))


def _captions(codec: DocumentCodec, sampler: Sampler, codes: list[torch.Tensor], seed: int) -> list[str]:
    reqs = [GenerationRequest(codec.image_to_text_prompt(c), "text", seed, max_new_tokens=48) for c in codes]
    return [codec.tok.decode(g.output).strip() for g in sampler.generate(reqs, SamplingConfig(greedy=True),
                                                                         prompts_per_step=16)]


def _answers(codec: DocumentCodec, sampler: Sampler, codes: list[torch.Tensor], qa: list[tuple[int, str, str]],
             template: str, seed: int) -> list[str]:
    reqs = [GenerationRequest(codec.vqa_prompt(codes[i], template.format(question=q)), "text", seed,
                              max_new_tokens=6) for i, q, _ in qa]
    return [codec.tok.decode(g.output).strip() for g in sampler.generate(reqs, SamplingConfig(greedy=True),
                                                                         prompts_per_step=32)]


def _text_to_image(bundle: ModelBundle, codec: DocumentCodec, sampler: Sampler, images: list[DemoImage],
                   seed: int) -> dict:
    """Each prompt's generated image ranked by the bundle's encoder among the n prompts (top-1), next
    to the same for the real images (the encoder's ceiling)."""
    rng = np.random.default_rng(seed)
    prompts = [im.captions[rng.integers(len(im.captions))] for im in images]
    reqs = [GenerationRequest(codec.text_to_image_prompt(p), "image", seed + i, uncond_prompt=codec.uncond_image_prompt())
            for i, p in enumerate(prompts)]
    gens = sampler.generate(reqs, SamplingConfig(temperature=1.0, top_p=0.9, cfg_scale=3.0), prompts_per_step=16)
    made: list[Image.Image] = codec.decode_images([g.output for g in gens])
    txt = bundle.encoder.encode_text(prompts)
    gen_sim = bundle.encoder.encode_image(made) @ txt.T
    real_sim = bundle.encoder.encode_image([im.image for im in images]) @ txt.T
    target = torch.arange(len(images))
    return {"t2i_rank_top1_generated": float((gen_sim.argmax(0) == target).float().mean()),
            "t2i_rank_top1_real": float((real_sim.argmax(0) == target).float().mean()),
            "t2i_images": made}


@torch.no_grad()
def quick_eval(bundle: ModelBundle, images: Sequence[DemoImage], recipe: DemoRecipe | None = None,
               n: int = 50, seed: int = 0, t2i: bool = True) -> dict:
    """Cheap held-out sanity numbers (not the harness's metrics): greedy captions (word F1 against the
    most descriptive caption), greedy VQA (exact match with the majority answer), and text->image:
    each prompt's generated image ranked by the bundle's encoder among the n prompts (top-1), next to
    the same for the real images (the encoder's ceiling)."""
    recipe = recipe or DemoRecipe()
    images = list(images)[:n]
    codec = DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution)
    sampler = Sampler(bundle.model, bundle.config)
    codes = [c for c in bundle.vq.encode(preprocess([im.image for im in images], bundle.image_resolution))]
    caps = _captions(codec, sampler, codes, seed)
    f1 = [_word_f1(c, im.captions[0]) for c, im in zip(caps, images)]
    qa = [(i, q, a) for i, im in enumerate(images) for q, a in im.qa]
    answers = _answers(codec, sampler, codes, qa, recipe.vqa_template, seed)
    by_family: dict[str, list[bool]] = {}
    for (_, q, a), p in zip(qa, answers):
        by_family.setdefault(" ".join(q.split()[:2]), []).append(p.lower() == a.lower())
    result = {
        "n": len(images),
        "caption_word_f1": float(np.mean(f1)) if f1 else None,
        "caption_exact": float(np.mean([c == im.captions[0] for c, im in zip(caps, images)])) if caps else None,
        "vqa_exact": float(np.mean([p.lower() == a.lower() for (_, _, a), p in zip(qa, answers)])) if qa else None,
        "vqa_by_question": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_family.items())},
        "samples": [{"caption": c, "reference": im.captions[0]} for c, im in zip(caps[:4], images)]
                   + [{"question": q, "answer": p, "reference": a} for (_, q, a), p in list(zip(qa, answers))[:6]],
    }
    if t2i and bundle.encoder is not None:
        result.update(_text_to_image(bundle, codec, sampler, images, seed))
    return result
