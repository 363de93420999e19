"""The real predictor: task samples -> cm3leon generation requests -> predictions.

Per kind (docs/INTERFACES.md, "Documents"):
  t2i      [retrieved…] [shots…] caption <break> <image> → image codes → VQ decode (→ rerank)
  caption  [retrieved…] [shots…] <image> codes </image> [prefix] <break> → text
  vqa      [retrieved…] [shots…] <image> codes </image> <break> "Question: … Answer:" <break> → text
  edit     [retrieved…] instruction <break> <image> src </image> <break> <image> → image codes

Guidance streams come from the codec: CM3leon's unconditional stream replaces the text with
<mask> (text CFG, and CD-K's amateur); editing adds the image-only stream when image_cfg_scale
is set (InstructPix2Pix-style 3-stream guidance). Every request carries the sample's own seed,
so outputs do not depend on batch size or sharding (the sampler draws counter-based randoms).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cm3leon.document import Document, DocumentCodec
from cm3leon.sampling import (GenerationRequest, Sampler, SamplingConfig, auto_batch_size,
                              continuation_logprobs, rerank)
from evals.engine import Batch, Item
from tasks.spec import TaskSpec


def sampling_config(spec: TaskSpec) -> SamplingConfig:
    g = spec.generation
    return SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, greedy=g.greedy,
                          cfg_scale=g.cfg_scale, image_cfg_scale=g.image_cfg_scale if spec.kind == "edit" else None,
                          cdk_alpha=g.cdk_alpha, cdk_k=g.cdk_k, mix_cdk_fraction=g.mix_cdk_fraction,
                          n_candidates=g.n_candidates if spec.output_modality == "image" else 1)


def _needs_uncond(s: SamplingConfig) -> bool:
    return s.cfg_scale != 1.0 or s.cdk_alpha is not None or s.image_cfg_scale is not None


def cut_at_stop(text: str, stops: list[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


def _vqa_answer(sample) -> str:
    """The answer an in-context VQA example shows: the annotators' majority answer."""
    mc = (sample.meta or {}).get("multiple_choice_answer")
    if isinstance(mc, str) and mc:
        return mc
    refs = sample.references or [""]
    return max(set(refs), key=lambda a: (refs.count(a), -refs.index(a)))


class ModelPredictor:
    """Predictor over a cm3leon ModelBundle (cm3leon.checkpoint.load)."""

    def __init__(self, bundle: Any, *, batch_size: int | None = None, device: str = "cpu", dtype: str = "float32") -> None:
        self.bundle = bundle
        self.cfg = bundle.config
        self.codec = DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution)
        self.sampler = Sampler(bundle.model, bundle.config)
        # None: fill a KV-cache budget (a tiny model on a CPU would otherwise spend its time in Python)
        self.batch_size = batch_size or auto_batch_size(bundle.config, device, bundle.model.tok_embeddings.weight.dtype)
        self.device = device
        self.encoder = bundle.encoder
        self.fingerprint = bundle.fingerprint or self._weights_hash()
        from cm3leon.checkpoint import ALIASES

        is_demo = bundle.path is not None and Path(bundle.path).resolve() == Path(ALIASES["demo"]).resolve()
        self.demo_encoder = bundle.encoder if is_demo else None
        self._retrievers: dict[tuple, Any] = {}
        self._codes: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # image content -> VQ codes (LRU)
        self._scorers: dict[str, Any] = {}

    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.bundle.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- identities that change results besides the weights
    def task_fingerprint(self, spec: TaskSpec) -> dict[str, str]:
        out: dict[str, str] = {}
        r = spec.retrieval
        if r.enabled and r.k > 0:
            out["bank"] = self._bank_fingerprint(r.bank)
            out["retrieval_encoder"] = str(self.bundle.encoder.fingerprint()) if self.bundle.encoder is not None else ""
        if spec.generation.rerank and spec.generation.n_candidates > 1 and spec.generation.scorer != "lm":
            out["scorer"] = str(self._scorer(spec.generation.scorer).fingerprint())  # "lm" is the model itself
        return out

    def _bank_dir(self, bank: str) -> Path:
        if bank == "model":
            if self.bundle.bank_dir is None:
                raise ValueError("retrieval.bank=model but the checkpoint ships no bank/; give a bank folder "
                                 "(--set retrieval.bank=PATH) or turn retrieval off (--retrieval-k 0)")
            return Path(self.bundle.bank_dir)
        path = Path(bank).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"retrieval bank folder not found: {path}")
        return path

    def _bank_fingerprint(self, bank: str) -> str:
        from cm3leon.checkpoint import fingerprint_folder

        return fingerprint_folder(self._bank_dir(bank))

    def _retriever(self, spec: TaskSpec):
        r = spec.retrieval
        key = (r.bank, r.max_similarity, r.prefer_multimodal, r.k)
        if key not in self._retrievers:
            from cm3leon.retrieval import MemoryBank, Retriever, SelectionConfig

            if self.bundle.encoder is None:
                raise ValueError("retrieval needs the checkpoint's dual encoder (encoder.safetensors)")
            bank = MemoryBank.load(self._bank_dir(r.bank))
            self._retrievers[key] = Retriever(bank, self.bundle.encoder, SelectionConfig(
                k=r.k, max_similarity=r.max_similarity, prefer_multimodal=r.prefer_multimodal))
        return self._retrievers[key]

    def _scorer(self, name: str):
        if name not in self._scorers:
            if name == "model":
                if self.bundle.encoder is None:
                    raise ValueError("generation.rerank with scorer=model needs the checkpoint's dual encoder")
                self._scorers[name] = self.bundle.encoder
            elif name == "demo":
                from evals.scoring import _load_encoder

                self._scorers[name] = _load_encoder("demo", self, self.device)
            else:
                from cm3leon.encoder import load_encoder

                self._scorers[name] = load_encoder(name, device=self.device)
        return self._scorers[name]

    # --- documents
    def _retrieved_batch(self, spec: TaskSpec, items: list[Item]) -> list[tuple[list[Document], list[dict[str, Any]]]]:
        """Retrieved documents for a batch of samples (one search for all), in the task's direction."""
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
        for docs in self._retriever(spec).augment_batch(queries, r.k, exclude=exclude):
            built, records = [], []
            for d in docs:
                img = d.image
                if spec.kind in ("t2i", "edit"):  # caption first, as in text-to-image documents
                    parts = [p for p in (d.text, img) if p is not None]
                else:  # image first, as in image-to-text documents
                    parts = [p for p in (img, d.text) if p is not None]
                built.append(Document(parts))
                records.append({"id": d.id, "text": d.text, "image": d.image_path, "score": d.meta.get("score")})
            out.append((built, records))
        return out

    # --- images -> VQ codes, once per distinct image
    CODE_CACHE_SIZE = 4096

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

    def _shots(self, spec: TaskSpec, item: Item) -> list[Document]:
        p = spec.prompt
        out = []
        for j, shot in enumerate(item.sample.shots):
            img = item.images.get(f"shot:{j}")
            if spec.kind == "t2i":
                tmpl = p.shot_template or p.template
                out.append(Document([tmpl.format(caption=shot.text, answer=""), img]))
            elif spec.kind == "caption":
                tmpl = p.shot_template or (p.template + (" " if p.template else "") + "{answer}")
                out.append(Document([img, tmpl.format(answer=shot.references[0])]))
            elif spec.kind == "vqa":
                tmpl = p.shot_template or (p.template + " {answer}")
                out.append(Document([img, tmpl.format(question=shot.text, answer=_vqa_answer(shot))]))
        return out

    def _request(self, spec: TaskSpec, item: Item, sampling: SamplingConfig,
                 retrieved: tuple[list[Document], list[dict[str, Any]]]) -> tuple[GenerationRequest, str, list]:
        s, codec, p = item.sample, self.codec, spec.prompt
        docs, rec = retrieved
        context = [self._with_codes(d) for d in docs + self._shots(spec, item)]
        image = item.images.get("image")
        if isinstance(image, Image.Image):
            image = self._codes_for([image])[0]
        uncond = image_cond = None
        if spec.kind == "t2i":
            text = p.template.format(caption=s.text)
            prompt = codec.prompt(Document([text]), "image", context)
            if _needs_uncond(sampling):
                uncond = codec.uncond_image_prompt()
            modality = "image"
        elif spec.kind == "caption":
            text = p.template
            prompt = codec.prompt(Document([image] + ([text] if text else [])), "text", context)
            modality = "text"
        elif spec.kind == "vqa":
            text = p.template.format(question=s.text)
            prompt = codec.prompt(Document([image, text]), "text", context)
            modality = "text"
        else:  # edit
            text = p.template.format(instruction=s.text)
            prompt = codec.prompt(Document([text, image]), "image", context)
            if _needs_uncond(sampling):
                uncond = codec.edit_uncond_prompt()
            if sampling.image_cfg_scale is not None:
                image_cond = codec.edit_image_cond_prompt(image)
            modality = "image"
        budget = self.cfg.image_seq_len if modality == "image" else spec.generation.max_new_tokens
        longest = max(len(x) for x in (prompt, uncond or [], image_cond or []))
        if longest + budget > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens + {budget} to generate exceeds the model's "
                             f"max_seq_len {self.cfg.max_seq_len}")
        req = GenerationRequest(prompt=prompt, modality=modality, seed=s.seed,
                                max_new_tokens=spec.generation.max_new_tokens,
                                uncond_prompt=uncond, image_cond_prompt=image_cond)
        return req, text, rec

    def _rerank_score_fn(self, spec: TaskSpec, texts: list[str], images: list[list[Image.Image]]):
        """score_fn(request index, candidate codes) -> one score per candidate, higher is better."""
        if spec.generation.scorer == "lm":
            if spec.kind != "t2i":
                raise ValueError(f"generation.scorer=lm scores log p(caption | image) and needs a t2i task, "
                                 f"not {spec.kind}")

            def lm_score(i: int, codes: list[list[int]]) -> list[float]:
                prompts = [self.codec.image_to_text_prompt(torch.as_tensor(c, dtype=torch.long)) for c in codes]
                caption = self.bundle.tokenizer.encode(texts[i]) + [self.cfg.eos_id]
                return continuation_logprobs(self.bundle.model, prompts, caption, pad_id=self.cfg.pad_id)

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
        sampling = sampling_config(spec)
        retrieved = self._retrieved_batch(spec, batch.items)
        # every image of the batch through the VQ in one call (cached: VQA repeats images)
        self._codes_for([im for it in batch.items for k, im in it.images.items()
                          if (k == "image" or k.startswith("shot:")) and isinstance(im, Image.Image)]
                         + [p for docs, _ in retrieved for d in docs for p in d.parts if isinstance(p, Image.Image)])
        built = [self._request(spec, it, sampling, r) for it, r in zip(batch.items, retrieved)]
        requests = [b[0] for b in built]
        gens = self.sampler.generate(requests, sampling, batch_size=self.batch_size)
        outs: list[dict[str, Any]] = []
        if spec.output_modality == "text":
            for (req, text, rec), gen in zip(built, gens):
                raw = self.bundle.tokenizer.decode(gen.output)
                outs.append({"prediction": cut_at_stop(raw, spec.prompt.stop), "prompt": text, "retrieved": rec,
                             "extra": {"finished": bool(gen.finished[gen.best]) if gen.finished else None}})
            return outs
        images = [self.codec.decode_images(g.candidates) for g in gens]
        g = spec.generation
        if g.rerank and g.n_candidates > 1:
            gens = rerank(gens, self._rerank_score_fn(spec, [b[1] for b in built], images))
        for (req, text, rec), gen, imgs in zip(built, gens, images):
            out = {"prompt": text, "images": {"output": imgs[gen.best]}, "retrieved": rec, "best": gen.best}
            if len(imgs) > 1:
                out["candidates"] = imgs
                out["scores"] = gen.scores
            outs.append(out)
        return outs
