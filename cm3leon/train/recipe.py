"""What the demo build is made from: the in-memory training data and every knob of the recipe.

`DemoData` is the recipe's input (the harness turns its shapes world into it, see
tasks/shapes/training.py); `DemoRecipe` is the recipe itself. Together they are the identity of a
build (OUT/work/state.json), so a resumed build never mixes two recipes or two data sets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from PIL import Image

from ..config import ModelConfig
from ..encoder import NativeEncoderConfig
from ..text import TextTokenizer
from ..vq import VQConfig

# The stages in build order; an LM stage's index seeds its data stream (see lm.train_lm).
STAGES = ("vq", "tokenizer", "encoder", "index", "extra", "pretrain", "sft")


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


def model_config(tok: TextTokenizer, recipe: DemoRecipe) -> ModelConfig:
    """The decoder's config: the tokenizer's vocabulary layout and the recipe's sizes (Chameleon-style:
    rmsnorm, rope, qk-norm, swiglu)."""
    seq = recipe.vq_config().tokens_per_image
    return ModelConfig(**tok.model_config_fields(), d_model=recipe.d_model, n_layers=recipe.n_layers,
                       n_heads=recipe.n_heads, max_seq_len=recipe.max_seq_len, norm="rmsnorm", qk_norm=True,
                       pos_encoding="rope", mlp="swiglu", image_seq_len=seq)
