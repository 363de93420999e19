"""FID (and FD in other feature spaces) and KID: streaming statistics, distances, preprocessing.

Pieces, each usable alone:
- `FeatureStats`: running float64 sum, sum of outer products and count; `merge` adds shards
  exactly (torchrun ranks), `save`/`load` as .npz (the file also holds `mu`/`sigma`, so
  pytorch-fid can read it).
- `frechet_distance(mu1, sigma1, mu2, sigma2)` and `kid(features1, features2)`.
- `preprocess(images, protocol)`: uint8 images -> the network input, per protocol.
- `extract_features`, `image_stats`, `reference_stats` (cached on disk), `compute_fid`.

Protocols (how a uint8 image becomes the 299x299 network input):
- "pytorch-fid" (default; what CM3leon reported): x/255 in float32, `F.interpolate` bilinear
  to 299 with align_corners=False (no antialias), then 2x-1.
- "torch-fidelity": float32 in [0,255], TensorFlow-1 `resize_bilinear` (align_corners=False:
  source coordinate = dst * in/out, no half-pixel offset, neighbours clamped at the border),
  then (x-128)/128 — the arithmetic of torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`.
- "clean" (clean-fid's "clean" mode): each channel as a float32 PIL image (mode "F") resized to
  299 with PIL bicubic (antialiased when downsampling), clipped to [0,255], then (x-128)/128.
Image files are decoded with PIL and converted to RGB, as both reference tools do. Optional
`resolution`: first resize the short side to it (PIL bicubic) and center-crop a square.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from evals.metrics.inception import INPUT_SIZE, WEIGHTS_FILENAME, FIDInceptionV3, find_weights, load_fid_inception
from evals.metrics.result import MetricResult

PROTOCOLS = ("pytorch-fid", "torch-fidelity", "clean")
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
STATS_FORMAT = "cm3eval-feature-stats-v1"
INCEPTION_NAME = "inception"


# --------------------------------------------------------------------------------------------
# streaming statistics


@dataclass(eq=False)  # arrays inside: the generated __eq__ would be ambiguous
class FeatureStats:
    """Running moments of a feature set; mean and covariance come out of them exactly."""

    dim: int
    n: int = 0
    sum: np.ndarray | None = None  # [dim] float64
    sum_outer: np.ndarray | None = None  # [dim, dim] float64, sum of x x^T
    meta: dict[str, Any] = field(default_factory=dict)  # protocol, extractor id, ... (compatibility checks)
    keep_features: bool = False  # also keep the raw features (needed by KID and the bootstrap CI)
    _chunks: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"FeatureStats: dim must be >= 1, got {self.dim}")
        if self.sum is None:
            self.sum = np.zeros(self.dim, np.float64)
        if self.sum_outer is None:
            self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def from_features(cls, features, *, keep_features: bool = False, meta: dict | None = None) -> FeatureStats:
        x = _as_feature_matrix(features)
        stats = cls(x.shape[1], keep_features=keep_features, meta=dict(meta or {}))
        return stats.update(x)

    def update(self, features) -> FeatureStats:
        x = _as_feature_matrix(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: features have dim {x.shape[1]}, the statistics have dim {self.dim}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        if self.keep_features:
            self._chunks.append(x)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sample sets (a new object; sums add exactly)."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims differ ({self.dim} vs {other.dim})")
        _check_compatible(self.meta, other.meta, "FeatureStats.merge")
        keep = self.keep_features and other.keep_features
        out = FeatureStats(self.dim, self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer,
                           {**other.meta, **self.meta}, keep)
        if keep:
            out._chunks = [*self._chunks, *other._chunks]
        return out

    @property
    def features(self) -> np.ndarray | None:
        if not self.keep_features:
            return None
        if len(self._chunks) != 1:  # consolidate once so repeated access is cheap
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim))]
        return self._chunks[0]

    @property
    def mu(self) -> np.ndarray:
        self._need_samples(1)
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by n-1), as numpy.cov(rowvar=False) / pytorch-fid.

        From raw float64 moments; the cancellation error, ~1e-16 * (mean/std)^2 relative, is
        negligible for pooled activations (mean and spread of the same order)."""
        self._need_samples(2)
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry; rounding in the outer products may break it

    def _need_samples(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"FeatureStats: need at least {k} samples, have {self.n}")

    def save(self, path: str | os.PathLike) -> None:
        """Atomic .npz write (a killed job leaves no half-written cache file)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATS_FORMAT), "n": np.array(self.n, np.int64), "sum": self.sum,
            "sum_outer": self.sum_outer, "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.n >= 2:  # pytorch-fid reads only these two
            arrays["mu"], arrays["sigma"] = self.mu, self.sigma
        feats = self.features
        if feats is not None:
            # float32 halves the file and is lossless for network outputs (which are float32).
            as32 = feats.astype(np.float32)
            arrays["features"] = as32 if np.array_equal(as32, feats) else feats
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != STATS_FORMAT:
                    raise ValueError(f"not a {STATS_FORMAT} file (keys: {sorted(z.files)})")
                n = int(z["n"])
                s = np.asarray(z["sum"], np.float64)
                so = np.asarray(z["sum_outer"], np.float64)
                meta = json.loads(str(z["meta"]))
                feats = np.asarray(z["features"], np.float64) if "features" in z.files else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read feature statistics: {e}") from e
        d = s.shape[0] if s.ndim == 1 else -1
        if d < 1 or so.shape != (d, d) or n < 0 or not isinstance(meta, dict):
            raise ValueError(f"{path}: inconsistent feature statistics (sum {s.shape}, sum_outer {so.shape}, n {n})")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(so))):
            raise ValueError(f"{path}: feature statistics contain NaN or inf")
        if feats is not None and feats.shape != (n, d):
            raise ValueError(f"{path}: stored features have shape {feats.shape}, expected {(n, d)}")
        stats = cls(d, n, s, so, meta, keep_features=feats is not None)
        if feats is not None:
            stats._chunks = [feats]
        return stats


def _as_feature_matrix(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"features contain NaN or inf ({bad} of {x.shape[0]} rows)")
    return x


def _check_compatible(a: dict, b: dict, where: str) -> None:
    """Statistics from different protocols or networks must never be compared or merged."""
    for key in ("protocol", "extractor"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ValueError(f"{where}: {key} differs ({a[key]!r} vs {b[key]!r}); recompute one side")


# --------------------------------------------------------------------------------------------
# distances


def _check_moments(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"frechet_distance: {which} has mu {mu.shape} and sigma {sigma.shape}; need [D] and [D,D]")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"frechet_distance: {which} statistics contain NaN or inf")


def _psd_eigenvalues(w: np.ndarray, what: str) -> np.ndarray:
    """Clamp the rounding-level negative eigenvalues of a PSD matrix; a real negative one is an error."""
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -1e-6 * scale:
        raise ValueError(f"frechet_distance: {what} is not positive semi-definite (eigenvalue {w.min():.3g})")
    return np.clip(w, 0.0, None)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A with A A^T = sigma: Cholesky when sigma is positive definite (cheap), else the PSD square root."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:  # singular, e.g. fewer samples than dimensions
        w, v = np.linalg.eigh(sigma)
        w = _psd_eigenvalues(w, "sigma1")
        return (v * np.sqrt(w)) @ v.T


def _trace_sqrt_product(factor1: np.ndarray, sigma2: np.ndarray) -> float:
    # With sigma1 = A A^T, sigma1 sigma2 is similar to A^T sigma2 A, a symmetric PSD matrix: same
    # eigenvalues, but `eigvalsh` finds them faster and exactly real (scipy's sqrtm and the
    # general `eigvals` of the product are both slower and return complex rounding noise).
    m = factor1.T @ sigma2 @ factor1
    w = _psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2), "sigma1 sigma2")
    return float(np.sqrt(w).sum())


def _low_rank_factor(features: np.ndarray) -> np.ndarray | None:
    """Centred features / sqrt(n-1): a D x n factor of their covariance, when n-1 < D (else None)."""
    n, dim = features.shape
    if n - 1 >= dim:
        return None
    return (features - features.mean(axis=0)).T / np.sqrt(n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2), in float64.

    tr sqrt(s1 s2) = sum of square roots of the eigenvalues of s1 s2 (tiny negative rounding
    eigenvalues clamped to 0). Agrees with pytorch-fid's scipy `sqrtm` version.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_moments(mu1, sigma1, "first")
    _check_moments(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: feature dims differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(_psd_factor(sigma1), sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


@dataclass
class KID:
    mean: float
    std: float
    subset_size: int
    subsets: int


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, gamma: float, coef0: float, degree: int) -> float:
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    # Unbiased within-set terms drop the diagonal; the cross term keeps all m*m pairs.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(features1, features2, *, subset_size: int = 1000, subsets: int = 100, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> KID:
    """Kernel Inception Distance: unbiased MMD^2, polynomial kernel (x.y/D + 1)^3, over random subsets.

    Subsets as torch-fidelity draws them (`RandomState(seed).choice` without replacement, first
    set then second, per subset; its default seed is 2020); the subset size is clipped to the
    smaller set. Reports mean and (population) std over subsets. Computed in float64.
    """
    x, y = _as_feature_matrix(features1), _as_feature_matrix(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"kid: need at least 2 samples per set, have {x.shape[0]} and {y.shape[0]}")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        xi = x[rng.choice(x.shape[0], m, replace=False)]
        yi = y[rng.choice(y.shape[0], m, replace=False)]
        mmds[i] = _mmd2_unbiased(xi, yi, g, coef0, degree)
    return KID(float(mmds.mean()), float(mmds.std()), m, subsets)


# --------------------------------------------------------------------------------------------
# preprocessing


def _resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` on float [N,C,H,W], in torch-fidelity's float32 op order."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # TF1 maps dst pixel i to src i * in/out (no half-pixel centres); the scale is
        # rounded to float32 before the product, as in torch-fidelity.
        src = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, src - lo.to(src.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x.index_select(2, ylo), x.index_select(2, yhi)
    dx = dx.view(1, 1, 1, size)
    t = top.index_select(3, xlo) + (top.index_select(3, xhi) - top.index_select(3, xlo)) * dx
    b = bottom.index_select(3, xlo) + (bottom.index_select(3, xhi) - bottom.index_select(3, xlo)) * dx
    return t + (b - t) * dy.view(1, 1, size, 1)


def _resize_clean(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid: every channel resized alone as a float32 PIL image with bicubic, clipped to [0,255]."""
    out = np.empty((x.shape[0], x.shape[1], size, size), np.float32)
    arr = x.cpu().numpy().astype(np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            ch = Image.fromarray(arr[i, c])  # 2-D float32 -> mode "F"
            out[i, c] = np.asarray(ch.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(np.clip(out, 0.0, 255.0)).to(x.device)


def preprocess(images: torch.Tensor, protocol: str = "pytorch-fid", size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float32 [N,3,size,size] in [-1,1], resized as `protocol` does."""
    _check_uint8_batch(images)
    if protocol == "pytorch-fid":
        x = images.to(torch.float32) / 255  # torchvision ToTensor
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if protocol == "torch-fidelity":
        return (_resize_tf1_bilinear(images.to(torch.float32), size) - 128) / 128
    if protocol == "clean":
        return (_resize_clean(images, size) - 128) / 128
    raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def _check_uint8_batch(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch.Tensor [N,3,H,W], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0,255], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB [N,3,H,W], got shape {tuple(images.shape)}")


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly in `directory`, sorted by name (pytorch-fid's extensions)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder not found: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {d}")
    return files


def _square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` (PIL bicubic), then center-crop to a square."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _to_uint8_chw(item, resolution: int | None) -> torch.Tensor:
    """One image (path, PIL image or uint8 [3,H,W] tensor) -> uint8 [3,H,W]."""
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as im:
                img = im.convert("RGB")  # forces the full decode, so truncated files fail here
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ValueError(f"cannot read image {item}: {e}") from e
    elif isinstance(item, Image.Image):
        img = item.convert("RGB")
    elif isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 in [0,255], got dtype {item.dtype}")
        if item.dim() != 3 or item.shape[0] != 3:
            raise ValueError(f"image tensors must be RGB [3,H,W], got shape {tuple(item.shape)}")
        if resolution is None:
            return item
        img = Image.fromarray(item.permute(1, 2, 0).cpu().numpy())
    else:
        raise TypeError(f"unsupported image type {type(item).__name__}; use a path, PIL image or uint8 tensor")
    if resolution is not None:
        img = _square_resize(img, resolution)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _image_items(images) -> Sequence:
    """Normalise the accepted image inputs to a sequence of single images (or a 4-D batch)."""
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        _check_uint8_batch(images)
        if images.shape[0] == 0:
            raise ValueError("no images given")
        return images
    if isinstance(images, Image.Image):
        return [images]
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


# --------------------------------------------------------------------------------------------
# feature extractors


@dataclass
class Extractor:
    """A feature network and how to name it. `name` "inception" means the FID network (-> "FID");
    anything else gives "FD-<name>". The module receives float32 [N,3,S,S] in [-1,1] (S =
    `input_size`, resized per the protocol) and returns [N,D]; it does its own normalisation."""

    module: nn.Module
    name: str
    input_size: int = INPUT_SIZE
    id: str = ""  # fingerprint for cache keys and compatibility checks

    def __post_init__(self) -> None:
        if self.name == INCEPTION_NAME and not isinstance(self.module, FIDInceptionV3):
            raise ValueError(f"extractor name {INCEPTION_NAME!r} is reserved for the FID Inception network")
        if not self.id:
            self.id = f"{self.name}:{module_fingerprint(self.module)}"


def fid_name(extractor_name: str | None = None) -> str:
    """"FID" for the Inception network, "FD-<name>" in any other feature space."""
    return "FID" if extractor_name in (None, INCEPTION_NAME) else f"FD-{extractor_name}"


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_WEIGHTS_HASH: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_HASH:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _WEIGHTS_HASH[key] = h.hexdigest()[:16]
    return _WEIGHTS_HASH[key]


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Extractor:
    """The FID network from a local weights file; its id is the file's content hash."""
    path = find_weights(weights)
    return Extractor(load_fid_inception(path, device), INCEPTION_NAME, INPUT_SIZE,
                     f"{WEIGHTS_FILENAME.removesuffix('.pth')}:{_file_sha256(path)}")


def get_extractor(feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                  weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Extractor:
    if isinstance(feature_extractor, Extractor):
        return feature_extractor
    if feature_extractor is None:
        return inception_extractor(weights, device)
    if isinstance(feature_extractor, FIDInceptionV3):
        return Extractor(feature_extractor.eval(), INCEPTION_NAME)
    name = extractor_name or getattr(feature_extractor, "name", None)
    if not name:
        raise ValueError("a custom feature_extractor needs a name (extractor_name=...): its score is 'FD-<name>'")
    return Extractor(feature_extractor.eval(), name, int(getattr(feature_extractor, "input_size", INPUT_SIZE)))


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def iter_features(images, extractor: Extractor, *, protocol: str = "pytorch-fid", batch_size: int = 50,
                  resolution: int | None = None) -> Iterator[np.ndarray]:
    """Features of `images` (folder, uint8 tensor, or list of paths / PIL images / uint8 tensors),
    batch by batch, as float64 [B,D]. Images may differ in size: each is resized on its own."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _image_items(images)
    device = _module_device(extractor.module)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # Resize on the network's device (the clean protocol resizes with PIL on the CPU regardless).
        if isinstance(chunk, torch.Tensor) and resolution is None:
            x = preprocess(chunk.to(device), protocol, extractor.input_size)
        else:  # one at a time: sizes may differ, and resizing is per image anyway
            x = torch.cat([preprocess(_to_uint8_chw(it, resolution).to(device).unsqueeze(0), protocol,
                                      extractor.input_size) for it in chunk])
        with torch.no_grad():
            out = extractor.module(x.to(device))
        out = out.detach().float().cpu().flatten(1).double().numpy()
        if not np.all(np.isfinite(out)):
            last = start + len(chunk) - 1
            raise ValueError(f"{extractor.name} features of images {start}..{last} contain NaN or inf")
        yield out


def extract_features(images, extractor: Extractor, **kwargs) -> np.ndarray:
    return np.concatenate(list(iter_features(images, extractor, **kwargs)))


def _meta(extractor: Extractor, protocol: str, **more) -> dict[str, Any]:
    return {"protocol": protocol, "extractor": extractor.id, "extractor_name": extractor.name, **more}


def image_stats(images, extractor: Extractor, *, protocol: str = "pytorch-fid", batch_size: int = 50,
                resolution: int | None = None, keep_features: bool = False, meta: dict | None = None) -> FeatureStats:
    stats: FeatureStats | None = None
    for feats in iter_features(images, extractor, protocol=protocol, batch_size=batch_size, resolution=resolution):
        if stats is None:
            stats = FeatureStats(feats.shape[1], keep_features=keep_features,
                                 meta={**_meta(extractor, protocol, resolution=resolution), **(meta or {})})
        stats.update(feats)
    if stats is None:
        raise ValueError("no images given")
    return stats


# --------------------------------------------------------------------------------------------
# reference statistics, cached on disk


def image_set_fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """Hash of the sorted (file name, size, mtime) triples: changes when any file does."""
    h = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    if os.environ.get("CM3EVAL_CACHE_DIR"):
        return Path(os.environ["CM3EVAL_CACHE_DIR"]) / "fid-stats"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cm3eval" / "fid-stats"


def reference_stats(image_dir_or_files, cache_dir: str | os.PathLike | None = None, *,
                    protocol: str = "pytorch-fid", resolution: int | None = None,
                    feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                    weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 50, keep_features: bool = False) -> FeatureStats:
    """Statistics of a reference image set, from the cache when present, else computed and saved.

    The cache key is (image set fingerprint, resolution, protocol, extractor id). An unreadable
    or mismatching cache file is recomputed with a warning, never trusted. `resolution`: resize
    the short side to it (PIL bicubic) and center-crop square before the protocol's resize.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if isinstance(image_dir_or_files, (str, os.PathLike)):
        files = list_images(image_dir_or_files)
    else:
        files = [Path(f) for f in image_dir_or_files]
        if not files:
            raise ValueError("reference_stats: no image files given")
    ext = get_extractor(feature_extractor, extractor_name, weights, device)
    key = {"fingerprint": image_set_fingerprint(files), "resolution": resolution, "protocol": protocol,
           "extractor": ext.id}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"ref-{digest}.npz"
    if path.exists():
        try:
            stats = FeatureStats.load(path)
            if any(stats.meta.get(k) != v for k, v in key.items()) or stats.n != len(files):
                raise ValueError("its key does not match this image set / protocol / network")
            if not keep_features or stats.features is not None:
                return stats
        except ValueError as e:
            warnings.warn(f"ignoring FID reference cache {path}: {e}; recomputing", stacklevel=2)
    stats = image_stats(files, ext, protocol=protocol, batch_size=batch_size, resolution=resolution,
                        keep_features=keep_features, meta=key)
    stats.save(path)
    return stats


# --------------------------------------------------------------------------------------------
# the metric


def _load_stats_file(path: Path) -> FeatureStats | tuple[np.ndarray, np.ndarray]:
    """Our .npz, or a pytorch-fid `--save-stats` file (mu and sigma only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files:
                if "mu" not in z.files or "sigma" not in z.files:
                    raise ValueError(f"neither cm3eval feature statistics nor a pytorch-fid stats file "
                                     f"(keys: {sorted(z.files)})")
                return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read statistics: {e}") from e
    return FeatureStats.load(path)


def _is_feature_array(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 2
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 2


def compute_fid(gen_images_or_stats, ref_stats, *, protocol: str = "pytorch-fid",
                feature_extractor: Extractor | nn.Module | None = None, extractor_name: str | None = None,
                weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                batch_size: int = 50, resolution: int | None = None,
                kid_subsets: int | None = None, kid_subset_size: int = 1000, kid_seed: int = 2020,
                bootstrap: int = 0, seed: int = 0) -> MetricResult:
    """FID (or FD-<name>) of generated images against reference statistics.

    gen_images_or_stats: FeatureStats, a float [N,D] feature array, or images (folder, uint8
    [N,3,H,W] tensor, list of paths / PIL images / uint8 tensors). ref_stats: FeatureStats, a
    .npz path (ours or pytorch-fid's), a feature array, or images.
    kid_subsets: also report KID with that many subsets (torch-fidelity uses 100); needs
    features of both sides (reference stats made with keep_features=True).
    bootstrap: number of resamples of the generated features for a 95% percentile CI (default
    0 = off; expensive: one eigendecomposition of a DxD matrix per resample, ~1 s at D=2048).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    ext: Extractor | None = None

    def extractor() -> Extractor:  # loaded only when some side still needs features
        nonlocal ext
        if ext is None:
            ext = get_extractor(feature_extractor, extractor_name, weights, device)
        return ext

    def to_stats(obj, side: str) -> FeatureStats | tuple[np.ndarray, np.ndarray]:
        if isinstance(obj, FeatureStats):
            return obj
        if isinstance(obj, (str, os.PathLike)) and str(obj).endswith(".npz"):
            return _load_stats_file(Path(obj))
        if _is_feature_array(obj):
            return FeatureStats.from_features(obj, keep_features=True)
        return image_stats(obj, extractor(), protocol=protocol, batch_size=batch_size, resolution=resolution,
                           keep_features=kid_subsets is not None or (bootstrap > 0 and side == "gen"))

    gen, ref = to_stats(gen_images_or_stats, "gen"), to_stats(ref_stats, "ref")
    if not isinstance(gen, FeatureStats):
        raise ValueError("generated side: need FeatureStats, features or images (a mu/sigma-only file has no n)")
    ref_meta = ref.meta if isinstance(ref, FeatureStats) else {}
    _check_compatible(gen.meta, ref_meta, "compute_fid")
    for side_meta, side in ((gen.meta, "generated"), (ref_meta, "reference")):
        if side_meta.get("protocol") not in (None, protocol):
            raise ValueError(f"compute_fid: {side} statistics were made with protocol {side_meta['protocol']!r}, "
                             f"not {protocol!r}")
    mu_r, sigma_r = (ref.mu, ref.sigma) if isinstance(ref, FeatureStats) else ref
    mu_g, sigma_g = gen.mu, gen.sigma
    if mu_g.shape != mu_r.shape:
        raise ValueError(f"compute_fid: feature dims differ (generated {mu_g.shape[0]}, reference {mu_r.shape[0]})")

    name = (ext.name if ext is not None else None) or gen.meta.get("extractor_name") \
        or ref_meta.get("extractor_name") or extractor_name
    _check_moments(mu_r, sigma_r, "reference")
    # tr sqrt(s_g s_r) needs a factor A (A A^T = one covariance). With the features of a set
    # smaller than the dimension, its centred features are a thin factor: the eigenproblem
    # shrinks from D x D to n x n. Otherwise factor sigma_r once, for the estimate and every resample.
    ref_feats = ref.features if isinstance(ref, FeatureStats) else None
    factor_r = _low_rank_factor(ref_feats) if ref_feats is not None else None
    gen_thin = factor_r is None and gen.features is not None and gen.n - 1 < gen.dim
    if factor_r is None and not gen_thin:
        factor_r = _psd_factor(sigma_r)

    def fd(mu: np.ndarray, sigma: np.ndarray, feats: np.ndarray | None = None) -> float:
        _check_moments(mu, sigma, "generated")
        d = mu - mu_r
        if gen_thin:
            tr = _trace_sqrt_product(_low_rank_factor(gen.features if feats is None else feats), sigma_r)
        else:
            tr = _trace_sqrt_product(factor_r, sigma)
        return float(d @ d + np.trace(sigma) + np.trace(sigma_r) - 2.0 * tr)

    value = fd(mu_g, sigma_g)
    extra: dict[str, Any] = {"protocol": protocol,
                             "extractor": (ext.id if ext is not None else None) or gen.meta.get("extractor")
                             or ref_meta.get("extractor"),
                             "n_ref": ref.n if isinstance(ref, FeatureStats) else None}
    ci = None
    if bootstrap > 0:
        feats = gen.features
        if feats is None:
            raise ValueError("compute_fid: a bootstrap CI needs the generated features, not only their statistics")
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(bootstrap):
            s = feats[rng.integers(0, feats.shape[0], feats.shape[0])]
            vals.append(fd(s.mean(axis=0), np.cov(s, rowvar=False), s))
        lo, hi = np.quantile(vals, [0.025, 0.975])
        ci = (float(lo), float(hi))
        extra["bootstrap"] = bootstrap
    if kid_subsets is not None:
        if gen.features is None or ref_feats is None:
            raise ValueError("compute_fid: KID needs the features of both sets; the reference statistics have none "
                             "(compute them with keep_features=True)")
        k = kid(gen.features, ref_feats, subset_size=kid_subset_size, subsets=kid_subsets, seed=kid_seed)
        extra["kid"] = {"mean": k.mean, "std": k.std, "subset_size": k.subset_size, "subsets": k.subsets}
    return MetricResult(fid_name(name), value, ci, gen.n, None, extra)
