"""The demo recipe: every part of a CM3leon-style model trained from in-memory data.

Stages, in order (each leaves a checkpoint under OUT/work/; a rerun skips finished stages and
resumes an LM stage from its last step checkpoint):

  vq         VQ-GAN image tokenizer: L1 + MSE reconstruction + the quantizer loss; dead codes are
             restarted from the current batch's latents so the whole codebook gets used
  tokenizer  byte-level BPE over every text the model reads or writes
  encoder    dual encoder (CLIP loss) for retrieval and the demo's image/text scores
  index      every image encoded to VQ codes once (the LM never runs the VQ); the memory bank over
             the training documents; each document's neighbours by CM3leon's selection (relevance,
             modality, diversity; itself excluded; 20% query dropout)
  pretrain   retrieval-augmented CM3 on caption->image and image->caption documents with 0..k
             retrieved documents prefixed, a share CM3-masked, and classifier-free dropout (the
             caption becomes <mask>: exactly the unconditional stream the sampler uses)
  sft        instruction tuning on the harness's exact prompt layouts (captioning, VQA, text->image,
             editing with its two guidance streams), loss on the outputs only, pretraining mixed in

The result is a native checkpoint folder (cm3leon.checkpoint.save: config, decoder, VQ, tokenizer,
encoder) with the memory bank in OUT/bank/, so `checkpoint.load(OUT)` finds everything.

Packing: an LM example is a prefix plus branches that each continue it (an image, then its caption
and each of its questions). All branches of one example attend to the prefix but not to each other,
and each branch's positions continue from the prefix, so a branch sees exactly the sequence the
harness will prompt with, while the 38 image tokens are computed once instead of once per output.
Examples are packed into rows of max_seq_len with a block mask; positions restart per example.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checkpoint
from .config import ModelConfig
from .document import Document, DocumentCodec, cm3_mask
from .encoder import NativeDualEncoder, NativeEncoderConfig, contrastive_loss
from .text import TextTokenizer
from .transformer import Transformer
from .vq import VQConfig, VQModel, load_native as load_vq, preprocess, save_native as save_vq

STAGES = ("vq", "tokenizer", "encoder", "index", "extra", "pretrain", "sft")


# ----------------------------------------------------------------------------- data
@dataclass
class DemoImage:
    id: str
    image: Image.Image
    captions: list[str]  # the first is the most descriptive: the SFT captioning target and the bank's text
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, the annotators' majority answer)


@dataclass
class DemoEdit:
    instruction: str
    source: Image.Image
    target: Image.Image


@dataclass
class DemoData:
    images: list[DemoImage]
    edits: list[DemoEdit] = field(default_factory=list)
    # More scenes (captions + image), used only as SFT text->image examples: no bank entry, no
    # neighbours, no questions. Text->image needs many more distinct scenes than the other tasks:
    # on 4,000 images alone a long SFT memorises them (train loss 0.33) instead of composing.
    t2i_extra: list[DemoImage] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Identity of the texts and image bytes (a resumed run must see the same data)."""
        h = hashlib.sha256()
        for im in self.images + self.t2i_extra:
            h.update(json.dumps([im.id, im.captions, im.qa]).encode())
            h.update(hashlib.sha256(im.image.tobytes()).digest())
        for e in self.edits:
            h.update(e.instruction.encode())
            h.update(hashlib.sha256(e.source.tobytes() + e.target.tobytes()).digest())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- recipe
@dataclass
class DemoRecipe:
    """Every knob of the demo build. The defaults take about 40 minutes on 2 CPU cores (torch.compile on)."""

    seed: int = 0
    steps_scale: float = 1.0  # multiplies every step count (tests shrink it, a GPU run may grow it)
    image_resolution: int = 64  # the world's images (the dual encoder reads them at this size)
    # VQ-GAN: images resized to 48 px, f=8 -> 6x6 = 36 codes from 256. 48 = 3 cells x 16 px: the code
    # grid lines up with the world's 3x3 layout (a cell is 2x2 codes, a shape never straddles codes
    # of two cells), so a code names a quarter of one shape. At 64 px, f=8 cuts the 21.3 px cells at
    # several offsets and shapes at arbitrary places: far more distinct patches for 256 codes, and
    # shapes came back as blobs. Test-split reconstructions ranked by the demo encoder (R@1 among
    # 100): 64 px 45%, 48 px 58% (both 1300 steps), 48 px and 4000 steps 69.5% (real images 74.5%).
    vq_resolution: int = 48
    vq_base_channels: int = 32  # GroupNorm(32) needs multiples of 32
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 2, 2)
    vq_latent_channels: int = 32
    vq_embed_dim: int = 32
    vq_codebook: int = 256
    vq_steps: int = 4000
    vq_batch: int = 16
    vq_crop: int = 32  # train on 32 px windows (4x cheaper) ...
    vq_full_frac: float = 0.15  # ... except for this last share of the steps
    vq_ae_frac: float = 0.2  # share of steps as a plain autoencoder before the codebook (k-means) joins
    vq_fg_weight: float = 10.0  # extra loss weight of the shapes' pixels
    vq_lr: float = 3e-3
    vq_restart_every: int = 20  # codes unused since the last restart are re-seeded from batch latents ...
    vq_restart_until: float = 0.5  # ... during this first share of the quantized steps
    vq_bg_keep: float = 1.0  # share of pure-background latents among the code seeds (1.0: all of them)
    vq_kmeans_images: int = 256  # images whose latents seed the codebook (k-means)
    # text
    n_text: int = 512
    vqa_template: str = "Question: {question} Answer:"  # the shapes-vqa task's prompt.template
    caption_template: str = ""  # the shapes-caption task's prompt.template ("" = image <break> caption)
    # dual encoder
    enc_steps: int = 250
    enc_batch: int = 96
    enc_lr: float = 2e-3
    enc_text_dim: int = 64
    enc_text_layers: int = 2
    enc_text_max_len: int = 160  # bytes; the longest demo captions are ~140
    enc_dim: int = 128
    # retrieval (CM3leon: 3 documents per pair in training, 2 at inference, 20% query dropout)
    neighbours: int = 3
    retrieval_k_max: int = 2  # at most this many prefixed to one training sequence (sequence budget)
    retrieval_prob: float = 0.5  # share of pretraining documents that get retrieved documents
    query_dropout: float = 0.2
    max_similarity: float = 0.9
    # decoder (Chameleon-style: rmsnorm, rope, qk-norm, swiglu)
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 512
    # LM training
    rows: int = 12  # packed rows per step ...
    row_len: int = 320  # ... of this many tokens (attention over a packed row costs row_len^2: keep it short)
    warmup: int = 30
    weight_decay: float = 0.1
    pt_steps: int = 900
    pt_lr: float = 2.5e-3
    cm3_rate: float = 0.15  # share of pretraining documents CM3-masked
    pt_t2i_share: float = 0.65  # of the other documents, caption->image (the rest image->caption)
    cfg_dropout: float = 0.1  # caption -> <mask>: the unconditional stream of text->image CFG
    sft_steps: int = 3000
    sft_lr: float = 2e-3
    # example shares: image->text (caption + all VQA questions of the image), t2i, edit, pretraining
    sft_mix: tuple[float, float, float, float] = (0.3, 0.55, 0.07, 0.08)
    sft_t2i_retrieval_prob: float = 0.2
    t2i_extra_images: int = 16000  # train-split scenes after the bank's ones, as SFT text->image examples
    edit_cfg_dropout: float = 0.05  # each of the two editing guidance streams
    # bookkeeping (not part of the recipe's identity)
    ckpt_every: int = 100
    log_every: int = 25

    def steps(self, n: int) -> int:
        return max(1, round(n * self.steps_scale))

    def identity(self) -> dict:
        """The fields that change the result, JSON-normalised (tuples as lists) for comparison with state.json."""
        d = asdict(self)
        for k in ("ckpt_every", "log_every"):
            d.pop(k)
        return json.loads(json.dumps(d))

    def vq_config(self) -> VQConfig:
        return VQConfig(resolution=self.vq_resolution, base_channels=self.vq_base_channels,
                        channel_multiplier=list(self.vq_channel_multiplier), num_res_blocks=1, attn_resolutions=[],
                        latent_channels=self.vq_latent_channels, embed_dim=self.vq_embed_dim,
                        num_embeddings=self.vq_codebook, legacy=False)

    def encoder_config(self) -> NativeEncoderConfig:
        return NativeEncoderConfig(image_size=self.image_resolution, text_dim=self.enc_text_dim,
                                   text_layers=self.enc_text_layers, text_max_len=self.enc_text_max_len,
                                   dim=self.enc_dim)


# ----------------------------------------------------------------------------- small helpers
def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _autocast(device: torch.device):
    # bf16 only on CUDA: CPU bf16 matmuls are slower than fp32 on most machines
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # decay matrices only; norms, biases and qk-norm parameters are left alone
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- stage: VQ
def _foreground(x: torch.Tensor) -> torch.Tensor:
    """Bool [B,1,H,W]: pixels away from the image's median colour (the flat background of this world)."""
    bg = x.flatten(2).median(-1).values[:, :, None, None]
    return (x - bg).abs().amax(1, keepdim=True) > 0.1


@torch.no_grad()
def _code_candidates(z: torch.Tensor, fg: torch.Tensor, gen: torch.Generator, bg_keep: float) -> torch.Tensor:
    """Latent vectors [M,D] to seed codes from: every position that touches a shape, and only a few
    pure-background ones. Seeding by density would spend most of the codebook on background (90%
    of the positions), split one flat colour into many codes by context noise, and leave the LM
    with many names for the same patch."""
    f = fg.shape[-1] // z.shape[-1]
    touched = F.avg_pool2d(fg.float(), f).flatten() > 0
    keep = touched | (torch.rand(touched.shape, generator=gen) < bg_keep).to(touched.device)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])[keep].float()


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, cands: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed codes unused since the last restart with candidate latents (plus a little noise)."""
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0 or cands.shape[0] == 0:
        return 0
    pick = torch.randint(cands.shape[0], (dead.numel(),), generator=gen).to(cands.device)
    noise = 0.01 * cands.std() * torch.randn(dead.numel(), cands.shape[1], generator=gen).to(cands.device)
    vq.quantize.embedding.weight.data[dead.to(cands.device)] = cands[pick] + noise
    return int(dead.numel())


@torch.no_grad()
def _kmeans_init(vq: VQModel, cands: torch.Tensor, gen: torch.Generator, iters: int = 10) -> None:
    """Codebook = k-means centroids of autoencoder latents (a codebook that starts where the data is)."""
    K = vq.quantize.embedding.weight.shape[0]
    cent = cands[torch.randint(cands.shape[0], (K,), generator=gen).to(cands.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(cands, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, cands)
        counts = torch.bincount(assign, minlength=K).float()[:, None]
        empty = counts[:, 0] == 0  # an empty cluster takes a random candidate
        cent = torch.where(empty[:, None], cands[torch.randint(cands.shape[0], (K,), generator=gen).to(cands.device)],
                           sums / counts.clamp_min(1))
    vq.quantize.embedding.weight.data.copy_(cent)


def train_vq(images: Sequence[Image.Image], cfg: VQConfig, steps: int, batch: int, lr: float, seed: int,
             device: str | torch.device = "cpu", restart_every: int = 20, crop: int = 0, full_frac: float = 0.2,
             ae_frac: float = 0.3, fg_weight: float = 10.0, restart_until: float = 0.3, bg_keep: float = 0.01,
             kmeans_images: int = 256, log_every: int = 100) -> VQModel:
    """Train a VQ-GAN (no adversarial term: the demo images are flat shapes) at cfg.resolution.

    - The first ae_frac of the steps train a plain autoencoder (no quantizer), then the codebook
      starts as k-means of its latents (mostly those that touch a shape, see _code_candidates):
      much faster than learning through the quantizer from scratch.
    - Codes unused for restart_every steps are re-seeded the same way, during the first
      restart_until of the quantized steps only: later a code may die (a flat colour is better
      served by one code than by several that differ by context noise).
    - With crop > 0, all but the last full_frac of the steps see random crop x crop windows (taming
      trains on crops; the network is fully convolutional), aligned to the code grid so patches look
      as they will at inference; the last steps see whole images (half the batch: 4x the pixels) so
      GroupNorm's statistics settle.
    - Loss: L1 + MSE with the shapes' pixels weighted up (they cover a few percent of an image; left
      alone, the cheapest solution is background everywhere) + the quantizer loss."""
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pixels = preprocess(list(images), cfg.resolution)  # [N,3,H,W] in [-1,1], kept on the CPU
    vq = VQModel(cfg).to(device).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    usage = torch.zeros(cfg.num_embeddings, dtype=torch.long, device=device)
    ae_steps = int(ae_frac * steps)
    restart_end = ae_steps + restart_until * (steps - ae_steps)
    t0, window = time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, min(20, steps // 10 + 1))
        full = not crop or step >= (1 - full_frac) * steps
        x = pixels[torch.randint(len(pixels), (batch if not crop or not full else max(1, batch // 2),), generator=gen)]
        if not full:
            f = cfg.downsample_factor
            oy, ox = (f * torch.randint((cfg.resolution - crop) // f + 1, (2,), generator=gen)).tolist()
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        x = x.to(device)
        fg = _foreground(x)
        z = vq.quant_conv(vq.encoder(x))
        if step < ae_steps:
            zq, qloss = z, z.new_zeros(())
        else:
            if step == ae_steps:
                with torch.no_grad():
                    more = pixels[torch.randint(len(pixels), (kmeans_images,), generator=gen)].to(device)
                    cands = _code_candidates(vq.quant_conv(vq.encoder(more)), _foreground(more), gen, bg_keep)
                    _kmeans_init(vq, cands, gen)
                usage.zero_()
            elif (step - ae_steps) % restart_every == 0 and step < restart_end:
                _restart_dead_codes(vq, _code_candidates(z.detach(), fg, gen, bg_keep), usage, gen)
                usage.zero_()
            zq, qloss, codes = vq.quantize(z)
            usage += torch.bincount(codes.flatten(), minlength=cfg.num_embeddings)
        rec = vq.decode_latents(zq)
        w = 1.0 + fg_weight * fg.float()
        err = (rec - x).abs() + (rec - x) ** 2
        loss = (w * err).sum() / (w.sum() * x.shape[1]) + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            used = f"codes used {int((usage > 0).sum())}/{cfg.num_embeddings}" if step >= ae_steps else "autoencoder"
            _log(f"vq step {step + 1}/{steps} loss {np.mean(window):.4f} {used} "
                 f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s")
            window = []
    return vq.eval()


@torch.no_grad()
def encode_images(vq: VQModel, images: Sequence[Image.Image], device: str | torch.device = "cpu",
                  batch: int = 256) -> torch.Tensor:
    """Codes [N, image_seq_len] for every image (done once; the LM stages read these). Identical
    images (an edit's source is usually a training image) are encoded once."""
    vq = vq.to(device).eval()
    key = [hashlib.sha1(im.tobytes()).digest() + repr((im.mode, im.size)).encode() for im in images]
    first: dict[bytes, int] = {}
    for i, k in enumerate(key):
        first.setdefault(k, i)
    unique = list(first.values())
    out = [vq.encode(preprocess([images[j] for j in unique[i:i + batch]], vq.config.resolution).to(device)).cpu()
           for i in range(0, len(unique), batch)]
    if not out:
        return torch.zeros(0, vq.config.tokens_per_image, dtype=torch.long)
    codes = torch.cat(out)
    row = {k: n for n, k in enumerate(first)}
    return codes[torch.tensor([row[k] for k in key])]


# ----------------------------------------------------------------------------- stage: tokenizer
def train_text_tokenizer(texts: Sequence[str], n_text: int, image_codebook_size: int = 256) -> TextTokenizer:
    return TextTokenizer.train(texts, n_text=n_text, image_codebook_size=image_codebook_size)


def corpus(data: DemoData, recipe: DemoRecipe) -> list[str]:
    """Every text the model reads or writes, in the exact form it sees them."""
    out: list[str] = []
    for im in data.images:
        out += im.captions
        for q, a in im.qa:
            out += [recipe.vqa_template.format(question=q), a]
    out += [e.instruction for e in data.edits]
    if recipe.caption_template:
        out.append(recipe.caption_template)
    return out


# ----------------------------------------------------------------------------- stage: dual encoder
def train_encoder(images: Sequence[Image.Image], captions: Sequence[Sequence[str]], cfg: NativeEncoderConfig,
                  steps: int, batch: int, lr: float, seed: int, device: str | torch.device = "cpu",
                  log_every: int = 50) -> NativeDualEncoder:
    """CLIP-style contrastive training on (image, one of its captions) pairs; a batch never holds an
    image twice, so every off-diagonal pair is a true negative."""
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = NativeDualEncoder(cfg).to(device).train()
    pixels = torch.cat([enc.image_inputs(images[i:i + 512]).cpu() for i in range(0, len(images), 512)])
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    t0, window = time.perf_counter(), []
    batch = min(batch, len(images))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, min(20, steps // 10 + 1))
        idx = rng.choice(len(images), batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
        img = enc.forward_image(pixels[torch.from_numpy(idx)].to(device))
        txt = enc.forward_text(*enc.text_inputs(texts))
        loss = contrastive_loss(img, txt, enc.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            enc.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"encoder step {step + 1}/{steps} loss {np.mean(window):.4f} "
                 f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s")
            window = []
    return enc.eval()


# ----------------------------------------------------------------------------- stage: index (codes, bank, neighbours)
def build_bank(data: DemoData, encoder: NativeDualEncoder):
    """One multimodal document per training image: its most descriptive caption and the image."""
    from .retrieval import MemoryBank, RetrievalDoc

    docs = [RetrievalDoc(id=im.id, text=im.captions[0], image=im.image) for im in data.images]
    return MemoryBank.build(docs, encoder, progress=False)


def precompute_neighbours(bank, encoder: NativeDualEncoder, data: DemoData, recipe: DemoRecipe) -> torch.Tensor:
    """Rows [N, neighbours] of each training document's retrieved documents (-1 where fewer came back).

    The query is the document itself (caption with query dropout + image), itself excluded: CM3leon's
    training-time retrieval."""
    from .retrieval import RetrievalDoc, Retriever, SelectionConfig

    retriever = Retriever(bank, encoder, SelectionConfig(k=recipe.neighbours, max_similarity=recipe.max_similarity,
                                                         query_dropout=recipe.query_dropout))
    out = torch.full((len(data.images), recipe.neighbours), -1, dtype=torch.long)
    for s in range(0, len(data.images), 256):
        chunk = data.images[s:s + 256]
        queries = [RetrievalDoc(id=im.id, text=im.captions[0], image=im.image) for im in chunk]
        qvecs = retriever.query_vectors(queries, [recipe.seed * 1_000_003 + s + j for j in range(len(chunk))])
        picks = retriever.select(qvecs, recipe.neighbours, [{im.id} for im in chunk])
        for j, rows in enumerate(picks):
            for n, (row, _) in enumerate(rows):
                out[s + j, n] = row
    return out


# ----------------------------------------------------------------------------- LM examples and packing
@dataclass
class Example:
    """A prefix and branches that each continue it (see the module docstring). Loss: on the prefix
    (all but its first token) when prefix_loss, and on branch tokens whose flag is set."""

    prefix: list[int]
    branches: list[tuple[list[int], list[bool]]] = field(default_factory=list)
    prefix_loss: bool = False

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for b, _ in self.branches)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B,T]
    positions: torch.Tensor  # [B,T]
    mask: torch.Tensor  # [B,T,T] bool: query row may attend key column
    src: tuple[torch.Tensor, torch.Tensor]  # (row, col) of the logits that predict each target
    targets: torch.Tensor  # [M]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.tokens.to(device), self.positions.to(device), self.mask.to(device),
                     (self.src[0].to(device), self.src[1].to(device)), self.targets.to(device))


def pack(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """First-fit into rows of max_len tokens, longest first; examples longer than a row are dropped."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        n = len(ex)
        if n > max_len:
            continue
        for i, f in enumerate(free):
            if n <= f:
                rows[i].append(ex)
                free[i] -= n
                break
        else:
            rows.append([ex])
            free.append(max_len - n)
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    group = torch.full((B, T), -1, dtype=torch.long)  # example index within the row; -1 = padding
    branch = torch.full((B, T), -1, dtype=torch.long)  # -1 = prefix
    src_r, src_c, tgt = [], [], []
    for b, row in enumerate(rows):
        t = 0
        for g, ex in enumerate(row):
            P = len(ex.prefix)
            tokens[b, t:t + P] = torch.tensor(ex.prefix)
            positions[b, t:t + P] = torch.arange(P)
            group[b, t:t + P] = g
            if ex.prefix_loss:
                src_r += [b] * (P - 1)
                src_c += range(t, t + P - 1)
                tgt += ex.prefix[1:]
            last, t = t + P - 1, t + P
            for j, (toks, loss) in enumerate(ex.branches):
                n = len(toks)
                tokens[b, t:t + n] = torch.tensor(toks)
                positions[b, t:t + n] = torch.arange(P, P + n)
                group[b, t:t + n] = g
                branch[b, t:t + n] = j
                for i in range(n):
                    if loss[i]:
                        src_r.append(b)
                        src_c.append(last if i == 0 else t + i - 1)
                        tgt.append(toks[i])
                t += n
    idx = torch.arange(T)
    same = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
    causal = idx[None, :] <= idx[:, None]
    tree = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])
    mask = (same & causal[None] & tree) | torch.eye(T, dtype=torch.bool)[None]  # padding sees itself (no NaN)
    return Batch(tokens, positions, mask, (torch.tensor(src_r), torch.tensor(src_c)), torch.tensor(tgt))


def tree_forward(model: Transformer, batch: Batch, body: Callable | None = None) -> torch.Tensor:
    """Logits [M,V] at the batch's source positions: Transformer.forward with explicit positions and
    mask (the packed tree layout), and the vocabulary projection only where a loss is taken.

    body: a replacement for `_layers_and_head` (its torch.compile'd version). The embedding stays
    outside it because its max_seq_len check reads a tensor value, which would break the graph."""
    h = model._embed(batch.tokens, batch.positions)
    return (body or _layers_and_head)(model, h, model._rope(batch.positions), batch.mask[:, None], batch.src)


def _layers_and_head(model: Transformer, h: torch.Tensor, rope, mask: torch.Tensor,
                     src: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    for layer in model.layers:
        h = layer(h, rope, mask)
    return model._head(h[src[0], src[1]])


class ExampleMaker:
    """Builds LM examples in the harness's layouts, from pre-encoded codes (never runs the VQ)."""

    def __init__(self, codec: DocumentCodec, data: DemoData, image_codes: torch.Tensor, edit_codes: torch.Tensor,
                 neighbours: torch.Tensor, recipe: DemoRecipe, extra_codes: torch.Tensor | None = None) -> None:
        self.codec, self.cfg, self.tok, self.data, self.r = codec, codec.cfg, codec.tok, data, recipe
        self.image_codes, self.edit_codes, self.neighbours = image_codes, edit_codes, neighbours
        self.extra_codes = extra_codes if extra_codes is not None else torch.zeros(0, image_codes.shape[1], dtype=torch.long)
        if len(self.extra_codes) != len(data.t2i_extra):
            raise ValueError(f"{len(data.t2i_extra)} extra text->image scenes but {len(self.extra_codes)} code rows")
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok.encode(text)
        return self._ids[text]

    def image_tokens(self, codes: torch.Tensor) -> list[int]:
        return [self.cfg.boi_id, *self.codec.codes_to_tokens(codes), self.cfg.eoi_id]

    def retrieved(self, i: int, rng: np.random.Generator, image_first: bool, k: int) -> list[Document]:
        rows = [int(r) for r in self.neighbours[i] if r >= 0]
        if k <= 0 or not rows:
            return []
        pick = sorted(rng.choice(len(rows), min(k, len(rows)), replace=False))  # keep relevance order
        docs = []
        for j in pick:
            row = rows[j]
            caption, codes = self.data.images[row].captions[0], self.image_codes[row]
            docs.append(Document([codes, caption] if image_first else [caption, codes]))
        return docs

    def _k(self, rng: np.random.Generator, prob: float) -> int:
        return int(rng.integers(1, self.r.retrieval_k_max + 1)) if rng.random() < prob else 0

    # --- pretraining documents (loss on every token)
    def pretrain(self, rng: np.random.Generator) -> Example:
        i = int(rng.integers(len(self.data.images)))
        im, codes, cfg = self.data.images[i], self.image_codes[i], self.cfg
        k = self._k(rng, self.r.retrieval_prob)
        caption = im.captions[rng.integers(len(im.captions))]
        if rng.random() < self.r.cm3_rate:  # CM3: spans moved to the end, in either direction
            image_first = bool(rng.random() < 0.5)
            doc = Document([codes, caption] if image_first else [caption, codes])
            ids = self.codec.encode(doc, self.retrieved(i, rng, image_first, k))
            return Example(cm3_mask(ids, rng, cfg=cfg), prefix_loss=True)
        if rng.random() < self.r.pt_t2i_share:  # caption -> image; the caption dropped for CFG's uncond stream
            if rng.random() < self.r.cfg_dropout:
                prompt = self.codec.uncond_image_prompt()
            else:
                prompt = self.codec.text_to_image_prompt(caption, self.retrieved(i, rng, False, k))
            return Example(prompt + self.image_tokens(codes)[1:] + [cfg.eos_id], prefix_loss=True)
        # image -> caption, two of its captions as branches off one image
        prompt = self.codec.image_to_text_prompt(codes, self.retrieved(i, rng, True, k))
        picks = rng.choice(len(im.captions), min(2, len(im.captions)), replace=False)
        branches = [(self.ids(im.captions[j]) + [cfg.eos_id], [True] * (len(self.ids(im.captions[j])) + 1))
                    for j in picks]
        return Example(prompt, branches, prefix_loss=True)

    # --- SFT examples (loss on the outputs only)
    def image_to_text(self, rng: np.random.Generator) -> Example:
        """Captioning (the most descriptive caption) and every VQA question, branching off one image."""
        i = int(rng.integers(len(self.data.images)))
        im, cfg = self.data.images[i], self.cfg
        prompt = self.codec.image_to_text_prompt(self.image_codes[i])
        head = self.ids(self.r.caption_template) + [cfg.break_id] if self.r.caption_template else []
        cap = self.ids(im.captions[0]) + [cfg.eos_id]
        branches = [(head + cap, [False] * len(head) + [True] * len(cap))]
        for q, a in im.qa:
            ctx = self.ids(self.r.vqa_template.format(question=q)) + [cfg.break_id]
            ans = self.ids(a) + [cfg.eos_id]
            branches.append((ctx + ans, [False] * len(ctx) + [True] * len(ans)))
        return Example(prompt, branches)

    def text_to_image(self, rng: np.random.Generator) -> Example:
        """A scene of the bank (with retrieval now and then) or one of the extra scenes (without)."""
        n = len(self.data.images)
        i = int(rng.integers(n + len(self.data.t2i_extra)))
        im, codes = (self.data.images[i], self.image_codes[i]) if i < n else \
            (self.data.t2i_extra[i - n], self.extra_codes[i - n])
        if rng.random() < self.r.cfg_dropout:
            prompt = self.codec.uncond_image_prompt()
        else:
            caption = im.captions[rng.integers(len(im.captions))]
            docs = self.retrieved(i, rng, False, self._k(rng, self.r.sft_t2i_retrieval_prob)) if i < n else []
            prompt = self.codec.text_to_image_prompt(caption, docs)
        out = self.image_tokens(codes)[1:] + [self.cfg.eos_id]
        return Example(prompt, [(out, [True] * len(out))])

    def edit(self, rng: np.random.Generator) -> Example:
        j = int(rng.integers(len(self.data.edits)))
        src, tgt = self.edit_codes[j, 0], self.edit_codes[j, 1]
        u, p = rng.random(), self.r.edit_cfg_dropout
        if u < p:
            prompt = self.codec.edit_uncond_prompt()
        elif u < 2 * p:
            prompt = self.codec.edit_image_cond_prompt(src)
        else:
            prompt = self.codec.edit_prompt(self.data.edits[j].instruction, src)
        out = self.image_tokens(tgt)[1:] + [self.cfg.eos_id]
        return Example(prompt, [(out, [True] * len(out))])

    def sft(self, rng: np.random.Generator) -> Example:
        mix = np.array(self.r.sft_mix, dtype=float)
        if not self.data.edits:
            mix[2] = 0.0
        kind = int(rng.choice(4, p=mix / mix.sum()))
        return (self.image_to_text, self.text_to_image, self.edit, self.pretrain)[kind](rng)


def fill_rows(make: Callable[[np.random.Generator], Example], rng: np.random.Generator, rows: int,
              max_len: int) -> list[list[Example]]:
    """Draw examples until `rows` rows of max_len are (nearly) full."""
    examples, total, budget = [], 0, rows * max_len
    while total < 0.97 * budget:
        ex = make(rng)
        if len(ex) > max_len:
            continue
        examples.append(ex)
        total += len(ex)
    packed = pack(examples, max_len)
    return packed[:rows]


# ----------------------------------------------------------------------------- LM training loop
def train_lm(name: str, model: Transformer, make: Callable[[np.random.Generator], Example], steps: int, lr: float,
             recipe: DemoRecipe, device: torch.device, work: Path | None = None,
             compile_forward: bool = False) -> list[tuple[int, float]]:
    """AdamW + warmup/cosine; the data stream is a pure function of (seed, stage, step), so a run
    resumed from a step checkpoint sees the same batches as one that never stopped.

    compile_forward: run the forward through torch.compile (dynamic shapes: packed batches vary in length).
    It changes speed, not the recipe (about 1.3x per step on 2 CPU cores; the first steps compile)."""
    body = torch.compile(_layers_and_head, dynamic=True) if compile_forward else None
    opt = _adamw(model, lr, recipe.weight_decay)
    start, losses = 0, []
    ckpt = work / f"{name}.ckpt.pt" if work is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, losses = int(state["step"]), [tuple(x) for x in state["losses"]]
        _log(f"{name}: resuming at step {start}/{steps}")
    stage_id = STAGES.index(name) if name in STAGES else 99
    model.train()
    t0, window, n_tok = time.perf_counter(), [], 0
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, recipe.warmup)
        rng = np.random.default_rng([recipe.seed, stage_id, step])
        batch = collate(fill_rows(make, rng, recipe.rows, min(recipe.row_len, recipe.max_seq_len)),
                        model.config.pad_id).to(device)
        with _autocast(device):
            logits = tree_forward(model, batch, body)
        loss = F.cross_entropy(logits.float(), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        n_tok += int(batch.tokens.numel())
        if (step + 1) % recipe.log_every == 0 or step == steps - 1:
            dt = time.perf_counter() - t0
            losses.append((step + 1, float(np.mean(window))))
            _log(f"{name} step {step + 1}/{steps} loss {np.mean(window):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                 f"{(step + 1 - start) / dt:.2f} steps/s {n_tok / dt:.0f} tok/s")
            window = []
        if ckpt is not None and ((step + 1) % recipe.ckpt_every == 0) and step + 1 < steps:
            _atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                                "losses": [list(x) for x in losses]}, ckpt)
    model.eval()
    return losses


def pretrain(model: Transformer, maker: ExampleMaker, recipe: DemoRecipe, device: torch.device,
             work: Path | None = None, compile_forward: bool = False) -> list[tuple[int, float]]:
    return train_lm("pretrain", model, maker.pretrain, recipe.steps(recipe.pt_steps), recipe.pt_lr, recipe, device, work,
                    compile_forward)


def sft(model: Transformer, maker: ExampleMaker, recipe: DemoRecipe, device: torch.device,
        work: Path | None = None, compile_forward: bool = False) -> list[tuple[int, float]]:
    return train_lm("sft", model, maker.sft, recipe.steps(recipe.sft_steps), recipe.sft_lr, recipe, device, work,
                    compile_forward)


# ----------------------------------------------------------------------------- the whole build
def model_config(tok: TextTokenizer, recipe: DemoRecipe) -> ModelConfig:
    seq = recipe.vq_config().tokens_per_image
    return ModelConfig(**tok.model_config_fields(), d_model=recipe.d_model, n_layers=recipe.n_layers,
                       n_heads=recipe.n_heads, max_seq_len=recipe.max_seq_len, norm="rmsnorm", qk_norm=True,
                       pos_encoding="rope", mlp="swiglu", image_seq_len=seq)


class _State:
    """OUT/work/state.json: which stages are done, for which recipe and data."""

    def __init__(self, work: Path, identity: dict) -> None:
        self.path, self.identity = work / "state.json", identity
        self.done: list[str] = []
        self.seconds: dict[str, float] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("identity") != identity:
                changed = sorted(k for k in set(identity) | set(saved.get("identity", {}))
                                 if identity.get(k) != saved.get("identity", {}).get(k))
                raise ValueError(f"{work}: holds a build with a different recipe or data (changed: {changed}); "
                                 "rerun with fresh=True (--fresh) to start over")
            self.done, self.seconds = list(saved.get("done", [])), dict(saved.get("seconds", {}))

    def finish(self, stage: str, seconds: float) -> None:
        self.done.append(stage)
        self.seconds[stage] = round(seconds, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "done": self.done, "seconds": self.seconds}, indent=1))
        os.replace(tmp, self.path)


def train_demo(data: DemoData, recipe: DemoRecipe, out_dir: str | Path, *, device: str | torch.device = "cpu",
               fresh: bool = False, compile_forward: bool = False) -> dict:
    """Run every stage (resuming from OUT/work/), write the checkpoint folder OUT, return a summary
    (compile_forward: the LM stages' forward through torch.compile, see train_lm):
    {"stages_run": [...], "losses": {stage: [(step, loss), ...]}, "seconds": {stage: s}}."""
    from safetensors.torch import load_file, save_file

    from .retrieval import MemoryBank

    device = torch.device(device)
    out = Path(out_dir)
    work = out / "work"
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state = _State(work, {"recipe": recipe.identity(), "data": data.fingerprint()})
    summary: dict = {"stages_run": [], "losses": {}, "seconds": state.seconds}

    def run(stage: str) -> bool:
        if stage in state.done:
            _log(f"{stage}: done already (OUT/work), skipped")
            return False
        summary["stages_run"].append(stage)
        _log(f"{stage}: start")
        return True

    # --- VQ
    t = time.perf_counter()
    if run("vq"):
        vq = train_vq([im.image for im in data.images], recipe.vq_config(), recipe.steps(recipe.vq_steps),
                      recipe.vq_batch, recipe.vq_lr, recipe.seed, device, recipe.vq_restart_every,
                      recipe.vq_crop, recipe.vq_full_frac, recipe.vq_ae_frac, recipe.vq_fg_weight,
                      recipe.vq_restart_until, recipe.vq_bg_keep, recipe.vq_kmeans_images)
        save_vq(vq.cpu(), work / "vq.safetensors")
        state.finish("vq", time.perf_counter() - t)
    vq = load_vq(work / "vq.safetensors").eval()

    # --- text tokenizer
    t = time.perf_counter()
    if run("tokenizer"):
        tok = train_text_tokenizer(corpus(data, recipe), recipe.n_text, recipe.vq_codebook)
        tok.save(work / "tokenizer.json")
        state.finish("tokenizer", time.perf_counter() - t)
    tok = TextTokenizer.from_file(work / "tokenizer.json")

    # --- dual encoder
    t = time.perf_counter()
    if run("encoder"):
        enc = train_encoder([im.image for im in data.images], [im.captions for im in data.images],
                            recipe.encoder_config(), recipe.steps(recipe.enc_steps), recipe.enc_batch, recipe.enc_lr,
                            recipe.seed, device)
        enc.cpu().save(work / "encoder.safetensors")
        state.finish("encoder", time.perf_counter() - t)
    enc = NativeDualEncoder.load(work / "encoder.safetensors")

    # --- codes, bank, neighbours
    t = time.perf_counter()
    if run("index"):
        n = len(data.images)
        every = [im.image for im in data.images] + [x for e in data.edits for x in (e.source, e.target)]
        all_codes = encode_images(vq, every, device)
        codes, edit_codes = all_codes[:n], all_codes[n:].reshape(len(data.edits), 2, -1)
        _log(f"index: {len(every)} images as VQ codes ({time.perf_counter() - t:.0f} s)")
        if (work / "bank").exists():
            shutil.rmtree(work / "bank")  # a half-written bank from an interrupted run
        bank = build_bank(data, enc)
        bank.save(work / "bank")
        _log(f"index: memory bank of {len(bank)} documents ({time.perf_counter() - t:.0f} s)")
        neighbours = precompute_neighbours(bank, enc, data, recipe)
        _log(f"index: {recipe.neighbours} neighbours per document ({time.perf_counter() - t:.0f} s)")
        save_file({"images": codes.contiguous(), "edits": edit_codes.contiguous(), "neighbours": neighbours},
                  str(work / "index.safetensors"))
        vq.cpu()
        state.finish("index", time.perf_counter() - t)
    index = load_file(str(work / "index.safetensors"))

    # --- the extra text->image scenes as codes (a stage of its own: the bank's index does not change)
    t = time.perf_counter()
    if run("extra"):
        extra = encode_images(vq, [im.image for im in data.t2i_extra], device)  # [0, n] when there are none
        _log(f"extra: {len(data.t2i_extra)} text->image scenes as VQ codes ({time.perf_counter() - t:.0f} s)")
        save_file({"images": extra.contiguous()}, str(work / "extra.safetensors"))
        state.finish("extra", time.perf_counter() - t)
    extra_codes = load_file(str(work / "extra.safetensors"))["images"]
    cfg = model_config(tok, recipe)
    codec = DocumentCodec(tok, None, cfg, recipe.vq_resolution)
    maker = ExampleMaker(codec, data, index["images"], index["edits"], index["neighbours"], recipe, extra_codes)

    # --- LM stages
    torch.manual_seed(recipe.seed)
    model = Transformer(cfg).to(device)
    _log(f"decoder: {model.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.vocab_size}")
    for stage, fn, prev in (("pretrain", pretrain, None), ("sft", sft, "pretrain")):
        t = time.perf_counter()
        if run(stage):
            if prev is not None:
                model.load_state_dict(load_file(str(work / f"{prev}.safetensors")))
            summary["losses"][stage] = fn(model, maker, recipe, device, work, compile_forward)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(work / f"{stage}.safetensors"))
            (work / f"{stage}.ckpt.pt").unlink(missing_ok=True)
            state.finish(stage, time.perf_counter() - t)
    model.load_state_dict(load_file(str(work / "sft.safetensors")))

    # --- the checkpoint folder
    bundle = checkpoint.ModelBundle(cfg, model.cpu().eval(), tok, vq.cpu(), recipe.vq_resolution, encoder=enc)
    checkpoint.save(bundle, out)
    if (out / "bank").exists():
        shutil.rmtree(out / "bank")
    shutil.copytree(work / "bank", out / "bank")
    (out / "recipe.json").write_text(json.dumps(recipe.identity(), indent=1) + "\n")
    _log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file() and 'work' not in f.parts) / 1e6:.1f} MB "
         "without work/)")
    return summary


# ----------------------------------------------------------------------------- quick sanity evaluation
def _words(s: str) -> list[str]:
    return [w for w in "".join(c if c.isalnum() else " " for c in s.lower()).split()]


@torch.no_grad()
def quick_eval(bundle: checkpoint.ModelBundle, images: Sequence[DemoImage], recipe: DemoRecipe | None = None,
               n: int = 50, seed: int = 0, t2i: bool = True) -> dict:
    """Cheap held-out sanity numbers (not the harness's metrics): greedy captions (word F1 against the
    most descriptive caption), greedy VQA (exact match with the majority answer), and text->image:
    each prompt's generated image ranked by the bundle's encoder among the n prompts (top-1), next to
    the same for the real images (the encoder's ceiling)."""
    from .sampling import GenerationRequest, Sampler, SamplingConfig

    recipe = recipe or DemoRecipe()
    images = list(images)[:n]
    codec = DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution)
    sampler = Sampler(bundle.model, bundle.config)
    greedy = SamplingConfig(greedy=True)
    codes = [c for c in bundle.vq.encode(preprocess([im.image for im in images], bundle.image_resolution))]
    tok = bundle.tokenizer
    reqs = [GenerationRequest(codec.image_to_text_prompt(c), "text", seed, max_new_tokens=48) for c in codes]
    caps = [tok.decode(g.output).strip() for g in sampler.generate(reqs, greedy, batch_size=16)]
    f1 = []
    for c, im in zip(caps, images):
        p, r = _words(c), _words(im.captions[0])
        common = sum(min(p.count(w), r.count(w)) for w in set(p))
        f1.append(0.0 if not common else 2 * common / (len(p) + len(r)))
    qa = [(i, q, a) for i, im in enumerate(images) for q, a in im.qa]
    reqs = [GenerationRequest(codec.vqa_prompt(codes[i], recipe.vqa_template.format(question=q)), "text", seed,
                              max_new_tokens=6) for i, q, _ in qa]
    answers = [tok.decode(g.output).strip() for g in sampler.generate(reqs, greedy, batch_size=32)]
    by_family: dict[str, list[bool]] = {}
    for (_, q, a), p in zip(qa, answers):
        fam = " ".join(q.split()[:2])
        by_family.setdefault(fam, []).append(p.lower() == a.lower())
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
        rng = np.random.default_rng(seed)
        prompts = [im.captions[rng.integers(len(im.captions))] for im in images]
        reqs = [GenerationRequest(codec.text_to_image_prompt(p), "image", seed + i, uncond_prompt=codec.uncond_image_prompt())
                for i, p in enumerate(prompts)]
        gens = sampler.generate(reqs, SamplingConfig(temperature=1.0, top_p=0.9, cfg_scale=3.0), batch_size=16)
        made = codec.decode_images([g.output for g in gens])
        txt = bundle.encoder.encode_text(prompts)
        gen_sim = bundle.encoder.encode_image(made) @ txt.T
        real_sim = bundle.encoder.encode_image([im.image for im in images]) @ txt.T
        target = torch.arange(len(images))
        result["t2i_rank_top1_generated"] = float((gen_sim.argmax(0) == target).float().mean())
        result["t2i_rank_top1_real"] = float((real_sim.argmax(0) == target).float().mean())
        result["t2i_images"] = made
    return result
