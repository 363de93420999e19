"""The driver: every stage in order, resumable, ending in a native checkpoint folder.

Stages (each leaves its result under OUT/work/; OUT/work/state.json records which are done, for
which recipe and data, so a rerun skips finished stages and an LM stage resumes from its last step
checkpoint): vq, tokenizer, encoder, index, extra, pretrain, sft. The result is a checkpoint folder
(cm3leon.checkpoint.save: config, decoder, VQ, tokenizer, encoder) with the memory bank in OUT/bank/
and the recipe in OUT/recipe.json, so `checkpoint.load(OUT)` finds everything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .. import checkpoint
from ..config import ModelConfig
from ..document import DocumentCodec
from ..encoder import NativeDualEncoder
from ..errors import Cm3evalError
from ..text import TextTokenizer
from ..transformer import Transformer
from ..vq import VQModel, load_native as load_vq, save_native as save_vq
from .common import log
from .encoder import train_encoder
from .examples import ExampleMaker
from .index import build_bank, precompute_neighbours
from .lm import pretrain, sft
from .recipe import DemoData, DemoRecipe, model_config
from .tokenizer import corpus, train_text_tokenizer
from .vq import encode_images, train_vq


class BuildMismatchError(Cm3evalError, ValueError):
    """OUT/work/ holds a build of another recipe or other data (resuming would mix two builds)."""


def _changed(saved: dict, now: dict) -> list[str]:
    """The keys that differ, one level down where both sides are dicts ("recipe.pt_lr", "data")."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        elif a != b:
            out.append(k)
    return out


class _State:
    """OUT/work/state.json: which stages are done, for which recipe and data."""

    def __init__(self, work: Path, identity: dict) -> None:
        self.path, self.identity = work / "state.json", identity
        self.done: list[str] = []
        self.seconds: dict[str, float] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("identity") != identity:
                changed = _changed(saved.get("identity", {}), identity)
                raise BuildMismatchError(f"{work}: holds a build with a different recipe or data (changed: {changed}); "
                                         "rerun with fresh=True (--fresh) to start over")
            self.done, self.seconds = list(saved.get("done", [])), dict(saved.get("seconds", {}))

    def finish(self, stage: str, seconds: float) -> None:
        self.done.append(stage)
        self.seconds[stage] = round(seconds, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "done": self.done, "seconds": self.seconds}, indent=1))
        os.replace(tmp, self.path)


@dataclass
class _Build:
    """One build in progress: its inputs, its work folder and what it has done so far."""

    data: DemoData
    recipe: DemoRecipe
    device: torch.device
    work: Path
    state: _State
    summary: dict = field(default_factory=dict)

    def stage(self, name: str, body: Callable[[float], None]) -> None:
        """Run body(start time) unless the stage is done already; record it as done when it returns."""
        t = time.perf_counter()
        if name in self.state.done:
            log(f"{name}: done already (OUT/work), skipped")
            return
        self.summary["stages_run"].append(name)
        log(f"{name}: start")
        body(t)
        self.state.finish(name, time.perf_counter() - t)


def _vq(b: _Build) -> VQModel:
    r = b.recipe

    def body(_: float) -> None:
        vq = train_vq([im.image for im in b.data.images], r.vq_config(), r.steps(r.vq_steps), r.vq_batch, r.vq_lr,
                      r.seed, b.device, r.vq_restart_every, r.vq_crop, r.vq_full_frac, r.vq_ae_frac, r.vq_fg_weight,
                      r.vq_restart_until, r.vq_bg_keep, r.vq_kmeans_images)
        save_vq(vq.cpu(), b.work / "vq.safetensors")

    b.stage("vq", body)
    return load_vq(b.work / "vq.safetensors").eval()


def _tokenizer(b: _Build) -> TextTokenizer:
    def body(_: float) -> None:
        train_text_tokenizer(corpus(b.data, b.recipe), b.recipe.n_text, b.recipe.vq_codebook).save(
            b.work / "tokenizer.json")

    b.stage("tokenizer", body)
    return TextTokenizer.from_file(b.work / "tokenizer.json")


def _encoder(b: _Build) -> NativeDualEncoder:
    r = b.recipe

    def body(_: float) -> None:
        enc = train_encoder([im.image for im in b.data.images], [im.captions for im in b.data.images],
                            r.encoder_config(), r.steps(r.enc_steps), r.enc_batch, r.enc_lr, r.seed, b.device)
        enc.cpu().save(b.work / "encoder.safetensors")

    b.stage("encoder", body)
    return NativeDualEncoder.load(b.work / "encoder.safetensors")


def _index(b: _Build, vq: VQModel, enc: NativeDualEncoder) -> dict[str, torch.Tensor]:
    """Every image (training images, then each edit's source and target) as VQ codes, the memory
    bank, each document's neighbours."""
    data, work = b.data, b.work

    def body(t: float) -> None:
        n = len(data.images)
        every = [im.image for im in data.images] + [x for e in data.edits for x in (e.source, e.target)]
        all_codes = encode_images(vq, every, b.device)
        codes, edit_codes = all_codes[:n], all_codes[n:].reshape(len(data.edits), 2, -1)
        log(f"index: {len(every)} images as VQ codes ({time.perf_counter() - t:.0f} s)")
        if (work / "bank").exists():
            shutil.rmtree(work / "bank")  # a half-written bank from an interrupted run
        bank = build_bank(data, enc)
        bank.save(work / "bank")
        log(f"index: memory bank of {len(bank)} documents ({time.perf_counter() - t:.0f} s)")
        neighbours = precompute_neighbours(bank, enc, data, b.recipe)
        log(f"index: {b.recipe.neighbours} neighbours per document ({time.perf_counter() - t:.0f} s)")
        save_file({"images": codes.contiguous(), "edits": edit_codes.contiguous(), "neighbours": neighbours},
                  str(work / "index.safetensors"))
        vq.cpu()

    b.stage("index", body)
    return load_file(str(work / "index.safetensors"))


def _extra(b: _Build, vq: VQModel) -> torch.Tensor:
    """The extra text->image scenes as codes (a stage of its own: the bank's index does not change)."""
    def body(t: float) -> None:
        extra = encode_images(vq, [im.image for im in b.data.t2i_extra], b.device)  # [0, n] when there are none
        log(f"extra: {len(b.data.t2i_extra)} text->image scenes as VQ codes ({time.perf_counter() - t:.0f} s)")
        save_file({"images": extra.contiguous()}, str(b.work / "extra.safetensors"))

    b.stage("extra", body)
    return load_file(str(b.work / "extra.safetensors"))["images"]


def _language_model(b: _Build, cfg: ModelConfig, maker: ExampleMaker, compile_forward: bool) -> Transformer:
    """Pretraining, then SFT from the pretrained weights; the decoder after SFT."""
    torch.manual_seed(b.recipe.seed)
    model = Transformer(cfg).to(b.device)
    log(f"decoder: {model.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.vocab_size}")
    for name, fn, prev in (("pretrain", pretrain, None), ("sft", sft, "pretrain")):
        def body(_: float, name: str = name, fn: Callable = fn, prev: str | None = prev) -> None:
            if prev is not None:
                model.load_state_dict(load_file(str(b.work / f"{prev}.safetensors")))
            b.summary["losses"][name] = fn(model, maker, b.recipe, b.device, b.work, compile_forward)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(b.work / f"{name}.safetensors"))
            (b.work / f"{name}.ckpt.pt").unlink(missing_ok=True)

        b.stage(name, body)
    model.load_state_dict(load_file(str(b.work / "sft.safetensors")))
    return model


def _write_folder(b: _Build, out: Path, bundle: checkpoint.ModelBundle) -> None:
    checkpoint.save(bundle, out)
    if (out / "bank").exists():
        shutil.rmtree(out / "bank")
    shutil.copytree(b.work / "bank", out / "bank")
    (out / "recipe.json").write_text(json.dumps(b.recipe.identity(), indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "work" not in f.parts)
    log(f"wrote {out} ({size / 1e6:.1f} MB without work/)")


def train_demo(data: DemoData, recipe: DemoRecipe, out_dir: str | Path, *, device: str | torch.device = "cpu",
               fresh: bool = False, compile_forward: bool = False) -> dict:
    """Run every stage (resuming from OUT/work/), write the checkpoint folder OUT, return a summary
    (compile_forward: the LM stages' forward through torch.compile, see lm.train_lm):
    {"stages_run": [...], "losses": {stage: [(step, loss), ...]}, "seconds": {stage: s}}.

    Raises BuildMismatchError when OUT/work/ holds a build of another recipe or other data."""
    out = Path(out_dir)
    work = out / "work"
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state = _State(work, {"recipe": recipe.identity(), "data": data.fingerprint()})
    b = _Build(data, recipe, torch.device(device), work, state,
               {"stages_run": [], "losses": {}, "seconds": state.seconds})
    vq = _vq(b)
    tok = _tokenizer(b)
    enc = _encoder(b)
    index = _index(b, vq, enc)
    extra_codes = _extra(b, vq)
    cfg = model_config(tok, recipe)
    codec = DocumentCodec(tok, None, cfg, recipe.vq_resolution)
    maker = ExampleMaker(codec, data, index["images"], index["edits"], index["neighbours"], recipe, extra_codes)
    model = _language_model(b, cfg, maker, compile_forward)
    _write_folder(b, out, checkpoint.ModelBundle(cfg, model.cpu().eval(), tok, vq.cpu(), recipe.vq_resolution,
                                                 encoder=enc))
    return b.summary
