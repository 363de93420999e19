"""The demo recipe: every part of a CM3leon-style model trained from in-memory data.

Stages, in order, one module each (each leaves a checkpoint under OUT/work/; a rerun skips finished
stages and resumes an LM stage from its last step checkpoint; build.py drives them):

  vq         vq.py: VQ-GAN image tokenizer: L1 + MSE reconstruction + the quantizer loss; dead codes
             are restarted from the current batch's latents so the whole codebook gets used
  tokenizer  tokenizer.py: byte-level BPE over every text the model reads or writes
  encoder    encoder.py: dual encoder (CLIP loss) for retrieval and the demo's image/text scores
  index      index.py: every image encoded to VQ codes once (the LM never runs the VQ); the memory
             bank over the training documents; each document's neighbours by CM3leon's selection
             (relevance, modality, diversity; itself excluded; 20% query dropout)
  extra      the extra text->image scenes as VQ codes
  pretrain   lm.py + examples.py: retrieval-augmented CM3 on caption->image and image->caption
             documents with 0..k retrieved documents prefixed, a share CM3-masked, and
             classifier-free dropout (the caption becomes <mask>: exactly the unconditional stream
             the sampler uses)
  sft        instruction tuning on the harness's exact prompt layouts (captioning, VQA, text->image,
             editing with its two guidance streams), loss on the outputs only, pretraining mixed in

recipe.py holds the inputs (DemoData, DemoRecipe), packing.py the tree layout of LM examples,
check.py a quick sanity evaluation. The result is a native checkpoint folder
(cm3leon.checkpoint.save) with the memory bank in OUT/bank/, so `checkpoint.load(OUT)` finds
everything.
"""

from .build import BuildMismatchError, train_demo
from .check import quick_eval
from .encoder import train_encoder
from .examples import ExampleMaker
from .index import build_bank, precompute_neighbours
from .lm import pretrain, sft, train_lm
from .packing import Batch, Example, collate, fill_rows, layers_and_head, pack, tree_forward
from .recipe import STAGES, DemoData, DemoEdit, DemoImage, DemoRecipe, model_config
from .tokenizer import corpus, train_text_tokenizer
from .vq import encode_images, train_vq

__all__ = [
    "STAGES", "Batch", "BuildMismatchError", "DemoData", "DemoEdit", "DemoImage", "DemoRecipe", "Example",
    "ExampleMaker", "build_bank", "collate", "corpus", "encode_images", "fill_rows", "layers_and_head",
    "model_config", "pack", "precompute_neighbours", "pretrain", "quick_eval", "sft", "train_demo",
    "train_encoder", "train_lm", "train_text_tokenizer", "train_vq", "tree_forward",
]
