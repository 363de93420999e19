"""The real predictor: task samples -> cm3leon generation requests -> predictions.

It only encodes, retrieves, generates and decodes; what the model is shown (the per-kind,
per-family prompt layouts) is tasks/prompts.py, and the layouts themselves are
cm3leon/families.py. Every request carries the sample's own seed, so outputs do not depend on
batch size or sharding (the sampler draws counter-based randoms).

Outputs: text tasks give the decoded text (every special the family bans is barred from
decoding); image tasks give the chosen image, every candidate's VQ codes (`extra.codes`, so a
report can decode the candidates it shows) and, only with `save_candidates`, every candidate
as an image. Set-up failures that regenerating cannot fix (no VQ decoder, no encoder, no bank)
raise `PredictorSetupError`, a Cm3evalError the engine treats as fatal.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cm3leon.document import Document, DocumentCodec
from cm3leon.errors import Cm3evalError
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig, continuation_logprobs, rerank
from cm3leon.scoring import score_continuations
from evals.protocol import Batch, FatalPredictorError, Item
from tasks import prompts
from tasks.spec import TaskSpec

log = logging.getLogger("cm3eval")


class PredictorSetupError(FatalPredictorError):
    """The predictor cannot serve this task at all (a missing decoder, encoder or bank): fatal for
    the run, never retried sample by sample."""


def sampling_config(spec: TaskSpec) -> SamplingConfig:
    """The task's sampler settings (TaskSpec.sampling_config owns the per-kind rules)."""
    return spec.sampling_config()


def cut_at_stop(text: str, stops: list[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


class ModelPredictor:
    """Predictor over a cm3leon ModelBundle (cm3leon.checkpoint.load)."""

    CODE_CACHE_SIZE = 4096

    def __init__(self, bundle: Any, *, device: str = "cpu", dtype: str = "float32",
                 save_candidates: bool = False, family: str | None = None,
                 sampler_options: dict[str, Any] | None = None) -> None:
        """`sampler_options`: Sampler kwargs (e.g. compile), plus `tp`: split the decoder over that
        many ranks (cm3leon.tensor_parallel, under torchrun). A predict() call is one sampler step
        over its batch's prompts: the engine chunks a task by the plan's prompts per step."""
        from evals.encoders import EncoderCache

        self.bundle = bundle
        self.cfg = bundle.config
        self.codec = DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution, family=family)
        self.family = self.codec.family
        options = dict(sampler_options or {})
        self.tp = int(options.pop("tp", 1) or 1)  # tensor-parallel ranks per model copy
        self.fingerprint = bundle.fingerprint or self._weights_hash()  # before any split of the weights
        if self.tp > 1:
            from cm3leon import tensor_parallel

            lay = tensor_parallel.layout(self.tp, device)  # the engine's Dist built it (cached)
            tensor_parallel.parallelize(bundle.model, lay.mesh["tp"])
            if lay.tp_rank == 0 and lay.dp_rank == 0:
                log.info("tensor parallel: the model is split over %d ranks per copy (%d of %d KV heads per "
                         "rank), %d data-parallel copies", self.tp, bundle.model.local_kv_heads,
                         bundle.config.n_kv_heads, lay.dp_size)
        self.sampler = Sampler(bundle.model, bundle.config, text_barred=self.codec.text_barred(), **options)
        self.device = device
        self.dtype = bundle.model.tok_embeddings.weight.dtype
        self.save_candidates = save_candidates
        self.encoder = bundle.encoder
        self.encoders = EncoderCache(model_bundle=bundle, device=device)
        self.model_path = bundle.path  # the engine hashes this folder's files (evals/protocol.py)
        self._retrievers: dict[tuple, Any] = {}
        self._codes: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # image content -> VQ codes (LRU)

    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.bundle.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- what a task needs, checked once before any sample is generated
    def check_ready(self, spec: TaskSpec) -> None:
        vq = self.bundle.vq
        if spec.kind != "t2i" and vq is None:
            raise PredictorSetupError(f"{spec.name}: the checkpoint has no VQ image tokenizer to encode input "
                                      "images; pass --vq PATH (Meta's tokenizer/vqgan.ckpt)")
        if spec.output_modality == "image" and (vq is None or not getattr(vq, "has_decoder", True)):
            raise PredictorSetupError(f"{spec.name}: decoding images needs a VQ decoder and the checkpoint has "
                                      "none (transformers' conversion drops it); pass --vq PATH "
                                      "(Meta's tokenizer/vqgan.ckpt + vqgan.yaml)")

    # --- identities that change results besides the weights
    def task_fingerprint(self, spec: TaskSpec, data_root: Path | None = None) -> dict[str, str]:
        """`data_root`: the task's, for a bank named relative to it (data:REL); without it the
        default data root ($CM3EVAL_DATA_ROOT) is used."""
        out: dict[str, str] = {"family": self.family.name, "image_size": str(self.codec.resolution)}
        r = spec.retrieval
        if r.enabled and r.k > 0:
            out["bank"] = self._bank_fingerprint(r.bank, self._default_root(spec) if data_root is None else data_root)
            out["retrieval_encoder"] = str(self._retrieval_encoder(spec).fingerprint())
        if spec.generation.rerank and spec.generation.n_candidates > 1 and spec.generation.scorer != "lm":
            out["scorer"] = str(self._scorer(spec.generation.scorer).fingerprint())  # "lm" is the model itself
        return out

    @staticmethod
    def _default_root(spec: TaskSpec) -> Path | None:
        from evals.bank_path import is_data_relative
        from tasks.loaders import resolve_data_root

        if not is_data_relative(spec.retrieval.bank):
            return None
        try:
            return resolve_data_root(spec, None, build=False)
        except Cm3evalError:
            return None  # resolve_bank names the missing data root

    def _bank_dir(self, bank: str, data_root: Path | None = None) -> Path:
        from evals.bank_path import BankPathError, resolve_bank

        if bank == "model":
            if self.bundle.bank_dir is None:
                raise PredictorSetupError("retrieval.bank=model but the checkpoint ships no bank/; give a bank "
                                          "folder (--set retrieval.bank=PATH, built by `cm3eval bank build`) or "
                                          "turn retrieval off (--retrieval-k 0)")
            return Path(self.bundle.bank_dir)
        try:
            path = resolve_bank(bank, data_root)
        except BankPathError as e:
            raise PredictorSetupError(str(e)) from None
        if path is None or not path.is_dir():
            raise PredictorSetupError(f"retrieval bank folder not found: {path} (build one with `cm3eval bank build`)")
        return path

    def _bank_fingerprint(self, bank: str, data_root: Path | None = None) -> str:
        from evals.provenance import tree_digest  # every byte of every bank file (digests cached)

        return tree_digest(self._bank_dir(bank, data_root))

    def _retrieval_encoder(self, spec: TaskSpec) -> Any:
        name = getattr(spec.retrieval, "encoder", None) or "model"
        return self._resolve(name, "--set retrieval.encoder=...")

    def _scorer(self, name: str) -> Any:
        return self._resolve(name, "--set generation.scorer=...")

    def _resolve(self, name: str, flag: str) -> Any:
        try:
            return self.encoders.get(name, flag=flag)
        except Cm3evalError:
            raise
        except (OSError, ValueError) as e:  # an encoder that cannot load is a set-up fault, not a sample's
            raise PredictorSetupError(f"encoder {name!r}: {e}") from None

    def _retriever(self, spec: TaskSpec, data_root: Path | None = None):
        r = spec.retrieval
        folder = self._bank_dir(r.bank, data_root)
        key = (str(folder), getattr(r, "encoder", None), r.max_similarity, r.prefer_multimodal, r.k)
        if key not in self._retrievers:
            from cm3leon.retrieval import Retriever, SelectionConfig
            from evals.provenance import load_verified_bank

            try:
                bank = load_verified_bank(folder)
            except (OSError, ValueError) as e:
                raise PredictorSetupError(f"retrieval bank: {e}") from None
            self._retrievers[key] = Retriever(bank, self._retrieval_encoder(spec), SelectionConfig(
                k=r.k, max_similarity=r.max_similarity, prefer_multimodal=r.prefer_multimodal))
        return self._retrievers[key]

    # --- retrieval: one search for the whole batch, in the task's direction
    def _retrieved_batch(self, spec: TaskSpec, items: list[Item],
                         data_root: Path | None = None) -> list[tuple[list[Document], list[dict[str, Any]]]]:
        r = spec.retrieval
        if not r.enabled or r.k <= 0:
            return [([], []) for _ in items]
        from cm3leon.retrieval import RetrievalDoc

        queries, exclude = [], []
        for it in items:
            s = it.sample
            text = s.text if spec.kind in ("t2i", "vqa", "edit") else None
            image = it.images.get("image")  # t2i queries are text only: the image is what we generate
            queries.append(RetrievalDoc(id=s.id, text=text or None, image=image))
            # never prefix the query's own document (its id, or its image under the bank's image root)
            exclude.append({s.id} | ({s.image} if s.image else set()))
        out = []
        for docs in self._retriever(spec, data_root).augment_batch(queries, r.k, exclude=exclude):
            built = [prompts.retrieved_document(spec.kind, d.text, d.image) for d in docs]
            # image_data: the decoded picture, for the report's thumbnail (records.py saves it, never the line)
            records = [{"id": d.id, "text": d.text, "image": d.image_path, "score": d.meta.get("score"),
                        "image_data": d.image} for d in docs]
            out.append((built, records))
        return out

    # --- images -> VQ codes, once per distinct image
    @staticmethod
    def _image_key(im: Image.Image) -> bytes:
        return hashlib.sha1(im.tobytes()).digest() + repr((im.mode, im.size)).encode()

    def _codes_for(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """VQ codes per image; the ones not cached are encoded together in one batch."""
        keys = [self._image_key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._codes}
        fresh = dict(zip(todo, self.codec.image_codes(list(todo.values())))) if todo else {}
        out = [fresh[k] if k in fresh else self._codes[k] for k in keys]
        for k in keys:
            if k in fresh:
                self._codes[k] = fresh[k]
            self._codes.move_to_end(k)
        while len(self._codes) > self.CODE_CACHE_SIZE:
            self._codes.popitem(last=False)
        return out

    def _with_codes(self, doc: Document) -> Document:
        """The document with its PIL images replaced by their (cached) codes."""
        ims = [p for p in doc.parts if isinstance(p, Image.Image)]
        if not ims:
            return doc
        codes = iter(self._codes_for(ims))
        return Document([next(codes) if isinstance(p, Image.Image) else p for p in doc.parts])

    def _item_codes(self, item: Item) -> dict[str, Any]:
        return {k: self._codes_for([im])[0] if isinstance(im, Image.Image) else im for k, im in item.images.items()}

    def _request(self, spec: TaskSpec, item: Item, sampling: SamplingConfig,
                 retrieved: tuple[list[Document], list[dict[str, Any]]]) -> tuple[GenerationRequest, str, list]:
        """(request, the query text, retrieval records) of one sample."""
        s, p = item.sample, spec.prompt
        docs, rec = retrieved
        images = self._item_codes(item)
        shots = prompts.shot_documents(spec.kind, p.template, p.shot_template, s.shots, images, self.family)
        context = [self._with_codes(d) for d in docs] + shots
        built = prompts.build(self.codec, spec.kind, p.template, s.text, seed=s.seed, sampling=sampling,
                              max_new_tokens=spec.generation.max_new_tokens, image=images.get("image"),
                              context=context, fields=prompts.sample_fields(spec.kind, s.meta))
        return built.request, built.text, rec

    def _rerank_score_fn(self, spec: TaskSpec, texts: list[str], images: list[list[Image.Image]] | None):
        """score_fn(request index, candidate codes) -> one score per candidate, higher is better."""
        if spec.generation.scorer == "lm":
            if spec.kind != "t2i":
                raise PredictorSetupError(f"generation.scorer=lm scores log p(caption | image) and needs a t2i "
                                          f"task, not {spec.kind}")

            def lm_score(i: int, codes: list[list[int]]) -> list[float]:
                prompts_ = [self.codec.image_to_text_prompt(torch.as_tensor(c, dtype=torch.long)) for c in codes]
                caption = self.bundle.tokenizer.encode(texts[i]) + [self.cfg.eos_id]
                return continuation_logprobs(self.bundle.model, prompts_, caption, pad_id=self.cfg.pad_id)

            return lm_score
        scorer = self._scorer(spec.generation.scorer)

        def clip_score(i: int, _codes) -> list[float]:
            t = scorer.encode_text([texts[i]]).float()
            v = scorer.encode_image(images[i]).float()
            return (v @ t[0]).tolist()

        return clip_score

    # --- the predictor protocol
    @torch.no_grad()
    def predict(self, batch: Batch) -> list[dict[str, Any]]:
        spec = batch.task
        self.check_ready(spec)
        sampling = sampling_config(spec)
        if spec.kind == "control":  # the model sees the source's edge map, never the source
            from evals.metrics.edges import condition_image

            for it in batch.items:
                it.images["image"] = condition_image(it.images["image"], self.bundle.image_resolution)
        retrieved = self._retrieved_batch(spec, batch.items, getattr(batch, "data_root", None))
        # every image of the batch through the VQ in one call (cached: VQA repeats images)
        self._codes_for([im for it in batch.items for k, im in it.images.items()
                         if (k == "image" or k.startswith("shot:")) and isinstance(im, Image.Image)]
                        + [p for docs, _ in retrieved for d in docs for p in d.parts if isinstance(p, Image.Image)])
        built = [self._request(spec, it, sampling, r) for it, r in zip(batch.items, retrieved)]
        if spec.kind == "dialog":
            return [self._ranked(req, text, rec, it.sample) for (req, text, rec), it in zip(built, batch.items)]
        # one sampler step over the whole batch: the plan sized it (the engine's chunk is its prompts per step)
        gens = self.sampler.generate([b[0] for b in built], sampling, prompts_per_step=len(built))
        if spec.output_modality == "text":
            return [self._text_output(spec, text, rec, gen) for (_, text, rec), gen in zip(built, gens)]
        return self._image_outputs(spec, built, gens)

    def _ranked(self, req: GenerationRequest, text: str, rec: list, sample: Any) -> dict[str, Any]:
        """A dialog round: every candidate answer (then eos) scored by log p(answer | prompt), the
        prompt run once (cm3leon.scoring); the prediction is the best-scored candidate."""
        tok, eos, options = self.bundle.tokenizer, self.cfg.eos_id, sample.meta["options"]
        conts = [tok.encode(o) + [eos] for o in options]
        # the prompt's KV is stored once; the candidates' suffixes are small, so one pass scores them all
        scores = score_continuations(self.bundle.model, req.prompt, conts, pad_id=self.cfg.pad_id)
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"prediction": options[best], "prompt": text, "retrieved": rec, "scores": scores, "best": best}

    def _text_output(self, spec: TaskSpec, text: str, rec: list, gen) -> dict[str, Any]:
        raw = self.bundle.tokenizer.decode(gen.output)
        return {"prediction": cut_at_stop(raw, spec.prompt.stop), "prompt": text, "retrieved": rec,
                "extra": {"finished": bool(gen.finished[gen.best]) if gen.finished else None}}

    def _image_outputs(self, spec: TaskSpec, built: list, gens: list) -> list[dict[str, Any]]:
        g = spec.generation
        texts = [b[1] for b in built]
        reranked = g.rerank and g.n_candidates > 1
        clip_rerank = reranked and g.scorer != "lm"
        # decode every candidate only when something looks at all of them (a CLIP reranker, or
        # --save-candidates); otherwise only the chosen one: 8 candidates are 8x the VQ decoding
        decode_all = clip_rerank or (self.save_candidates and g.n_candidates > 1)
        images = [self.codec.decode_images(gen.candidates) for gen in gens] if decode_all else None
        if reranked:
            gens = rerank(gens, self._rerank_score_fn(spec, texts, images))
        # one request's images are decoded together and never batched with other requests': a
        # conv's rounding depends on the batch it runs in (±1 grey level), and a sample's image
        # must not depend on its neighbours
        chosen = [imgs[gen.best] for imgs, gen in zip(images, gens)] if images is not None else \
            [self.codec.decode_images([gen.output])[0] for gen in gens]
        outs = []
        for i, ((_, text, rec), gen) in enumerate(zip(built, gens)):
            out: dict[str, Any] = {"prompt": text, "images": {"output": chosen[i]}, "retrieved": rec,
                                   "best": gen.best, "extra": {"codes": [list(map(int, c)) for c in gen.candidates]}}
            if gen.forwards:  # speculative decoding's counters (evals/decoding.py sums them)
                out["extra"].update(forwards=gen.forwards[gen.best], own_forwards=gen.own_forwards[gen.best],
                                    tokens=len(gen.output))
            if len(gen.candidates) > 1:
                out["scores"] = gen.scores
                if self.save_candidates:
                    out["candidates"] = images[i]
                elif images is not None:  # decoded for the reranker anyway: the report's thumbnails
                    out["candidate_images"] = images[i]
            outs.append(out)
        return outs
