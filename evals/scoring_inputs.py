"""What the metric adapters of `evals.scoring` read: a task's finished records and their files.

`Context` turns sample records into the inputs metrics need — image paths (generated outputs under
the task folder, sources / targets / references under the data root), texts (prompts, reference
captions, input captions), and embeddings. Embeddings are computed once per (encoder, role) and
shared by every metric of the task (CLIP-I, CLIP-T, CLIP-dir and CLIP-img all use the outputs'
image embeddings); images are opened chunk by chunk, so a test set never sits in memory whole.
Encoders come from `evals.encoders` (never from a predictor object).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cm3leon.errors import Cm3evalError
from tasks.images import ImageError, open_image
from evals.metrics.errors import MetricUnavailable

EMBED_CHUNK = 64  # = evals.metrics.clip_score.ENCODE_BATCH: the same batches, so the same numbers
FD_CHUNK = 256  # = the encoders' own internal batch (cm3leon.encoder._ENCODE_BATCH)


class ImageUnreadable(Cm3evalError, OSError):
    """An image a metric needs cannot be decoded (exit 2: bad input)."""


def open_rgb(path: Path) -> Image.Image:
    """The image fully decoded as RGB (a truncated file fails here, naming the path)."""
    try:
        return open_image(path)
    except ImageError as e:
        raise ImageUnreadable(str(e)) from None


def _text(record: dict[str, Any], role: str) -> str | None:
    if role == "prompt":
        return (record.get("input") or {}).get("text")
    if role == "reference":
        refs = record.get("references") or []
        return refs[0] if refs else None
    if role == "input_caption":
        return (record.get("meta") or {}).get("input_caption")
    raise ValueError(f"unknown text role {role!r}")


@dataclass
class Context:
    records: list[dict[str, Any]]
    task_dir: Path
    data_root: Path
    device: str
    seed: int
    encoders: Any  # evals.encoders.EncoderCache
    _emb: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    _dino: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, records: list[dict[str, Any]], task_dir: Path, data_root: Path, *, model_bundle: Any = None,
              device: str = "cpu", seed: int = 0, encoders: Any = None) -> Context:
        from evals.encoders import EncoderCache

        cache = encoders if encoders is not None else EncoderCache(model_bundle, device)
        return cls(records, Path(task_dir), Path(data_root), device, seed, cache)

    # --- inputs
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.records]

    def output_paths(self) -> list[Path]:
        return [self.task_dir / r["images"]["output"] for r in self.records]

    def data_images(self, role: str) -> list[Path]:
        """Paths of a data-root image role ("image": the source / the prompt's image, "target")."""
        return [self.data_root / r["input"][role] for r in self.records]

    def data_path(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.data_root / path

    def _image_paths(self, role: str) -> list[Path]:
        return self.output_paths() if role == "output" else self.data_images(role)

    def texts(self, role: str) -> list[str | None]:
        return [_text(r, role) for r in self.records]

    def need_texts(self, role: str, what: str, setting: str) -> None:
        missing = [r["id"] for r, t in zip(self.records, self.texts(role)) if not isinstance(t, str)]
        if missing:
            raise MetricUnavailable(f"{len(missing)} samples have no {what} (e.g. {missing[:3]}); give the "
                                    f"file with --set {setting}=PATH")

    # --- networks
    def encoder(self, name: str | None, metric: str, option: str = "encoder") -> Any:
        from evals.encoders import EncoderUnavailable

        try:
            return self.encoders.get(name, flag=f"metrics.{metric}.{option} (--set metrics.{metric}.{option}=...)")
        except EncoderUnavailable as e:
            raise MetricUnavailable(str(e)) from None

    def dino(self, weights: str | None) -> Any:
        key = weights or ""
        if key not in self._dino:
            from evals.metrics.dino import DinoEncoder

            try:
                self._dino[key] = DinoEncoder.load(weights, self.device)
            except FileNotFoundError as e:
                raise MetricUnavailable(f"DINO needs its weights: {e}") from None
        return self._dino[key]

    def put_dino(self, weights: str | None, encoder: Any) -> None:
        """Register an already-loaded DINO encoder (a command that loaded it to check the flag)."""
        self._dino[weights or ""] = encoder

    # --- embeddings, once per (encoder, role)
    def image_embeddings(self, enc_key: str, encoder: Any, role: str) -> Any:
        import torch

        key = ("image", enc_key or "", role)
        if key not in self._emb:
            paths = self._image_paths(role)
            parts = [encoder.encode_image([open_rgb(p) for p in paths[i:i + EMBED_CHUNK]])
                     for i in range(0, len(paths), EMBED_CHUNK)]
            self._emb[key] = torch.cat([torch.as_tensor(p) for p in parts])
        return self._emb[key]

    def text_embeddings(self, enc_key: str, encoder: Any, role: str) -> Any:
        import torch

        key = ("text", enc_key or "", role)
        if key not in self._emb:
            texts = [t if isinstance(t, str) else "" for t in self.texts(role)]
            parts = [encoder.encode_text(texts[i:i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)]
            self._emb[key] = torch.cat([torch.as_tensor(p) for p in parts])
        return self._emb[key]

    def fd_features(self, enc_key: str, encoder: Any, resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(generated, reference) image features in an encoder's space for FD-<name>; both sides
        square-cropped to `resolution` first when given (the FID protocol's one square crop)."""
        from evals.metrics.fid_resize import square_resize

        def feats(paths: list[Path]) -> np.ndarray:
            parts = []
            for i in range(0, len(paths), FD_CHUNK):
                ims = [open_rgb(p) for p in paths[i:i + FD_CHUNK]]
                if resolution:
                    ims = [square_resize(im, resolution) for im in ims]
                parts.append(encoder.encode_image(ims).double().numpy())
            return np.concatenate(parts)

        return feats(self.output_paths()), feats(self.data_images("image"))
