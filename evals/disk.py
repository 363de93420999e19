"""A run's disk need, estimated before it starts, against the free space where it will write.

The default coco-fid (30,000 prompts x 8 candidates at 512 px) would write about 110 GB if every
candidate were a PNG; the predictor writes the chosen image only (every candidate's VQ codes go
in the sample line) unless --save-candidates. The estimate counts everything a run writes:
- per sample: its PNGs (1, or 1 + n_candidates with --save-candidates) at the model's resolution,
  the input (and edit target) thumbnails the report shows, and the sample line with every
  candidate's codes;
- per task: config.json and its metrics.json entry, and its part of report.html (the images of
  the samples it shows, base64-embedded);
- per run folder: report.html's page itself.

PNG size: natural images compress to about half their raw RGB bytes (1.6 bytes per pixel:
512 px -> ~420 KB, the issue's 110 GB / 270,000 PNGs); the demo's flat shapes compress far
better (its input thumbnails by 10x, its generated images by 1.5x), so the estimate errs high
there, never low. A run is refused only when the estimate is over the free space (`--force-disk`
runs it anyway); a resume counts what it already wrote.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PNG_BYTES_PER_PIXEL = 1.6
CODE_BYTES = 6  # one VQ code in a JSON list: up to 5 digits and ", "
LINE_BYTES = 1_500  # a sample line's fixed part (ids, prompt, references, input digests, per-sample scores)
THUMBNAIL = 256  # px: the longest side of input thumbnails (evals.records) and of report images (reports.images)
CONFIG_BYTES = 8_000  # a task's config.json (resolved spec, one digest per model file or bank, versions)
METRICS_BYTES = 3_000  # a task's entry in metrics.json
REPORT_CARDS = 30  # samples report.html shows per task (24 and the extremes)
REPORT_PAGE_BYTES = 40_000  # report.html without its images (styles, tables, texts), once per run folder
INPUT_IMAGES = {"vqa": 1, "caption": 1, "edit": 2, "t2i": 0}  # thumbnails per sample: input (+ edit target)


@dataclass
class TaskDisk:
    task: str
    samples: int | None  # None: unknown before loading (a text task without --limit)
    images_per_sample: int
    resolution: int
    bytes: int  # still to write (what a resume already wrote is subtracted)


@dataclass
class DiskNeed:
    out: Path
    tasks: list[TaskDisk] = field(default_factory=list)
    free: int | None = None  # bytes free on --out's filesystem

    runs: int = 0  # run folders: one report.html page each

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.tasks) + self.runs * REPORT_PAGE_BYTES

    @property
    def insufficient(self) -> bool:
        return self.free is not None and self.total > self.free

    def describe(self) -> str:
        parts = [_part(t) for t in self.tasks]
        free = f"{_size(self.free)} free" if self.free is not None else "free space unknown"
        about = "at least" if any(t.samples is None for t in self.tasks) else "about"
        return f"disk: {about} {_size(self.total)} to write under {self.out} ({'; '.join(parts)}); {free}"


def _part(t: TaskDisk) -> str:
    if t.samples is None:
        return f"{t.task} ? (samples counted once loaded)"
    if not t.images_per_sample:
        return f"{t.task} {_size(t.bytes)}"
    return f"{t.task} {_size(t.bytes)} ({t.samples} samples x {t.images_per_sample} PNG at {t.resolution} px)"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing ancestor)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def written_bytes(folder: Path) -> int:
    """Bytes a previous run left under folder (a resume does not write them again)."""
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def png_bytes(side: int) -> int:
    return int(side * side * PNG_BYTES_PER_PIXEL)


def sample_bytes(spec: Any, resolution: int, codes_per_image: int, save_candidates: bool) -> tuple[int, int]:
    """(PNGs generated per sample, bytes per sample: PNGs, input thumbnails, the line) of one task."""
    thumbs = INPUT_IMAGES.get(spec.kind, 1) * png_bytes(min(THUMBNAIL, resolution))
    if spec.output_modality != "image":
        return 0, LINE_BYTES + 4 * spec.generation.max_new_tokens + thumbs
    n = spec.generation.n_candidates
    pngs = 1 + (n if save_candidates and n > 1 else 0)
    return pngs, pngs * png_bytes(resolution) + thumbs + LINE_BYTES + n * codes_per_image * CODE_BYTES


def report_bytes(spec: Any, samples: int, resolution: int, pngs: int) -> int:
    """A task's part of report.html: the images of the samples it shows, base64 (4/3 of the bytes);
    a text->image card also shows its reference image."""
    per_card = pngs + INPUT_IMAGES.get(spec.kind, 1) + (1 if spec.kind == "t2i" else 0)
    return min(samples, REPORT_CARDS) * per_card * png_bytes(min(THUMBNAIL, resolution)) * 4 // 3


def task_disk(spec: Any, samples: int | None, resolution: int, codes_per_image: int, save_candidates: bool,
              task_dir: Path) -> TaskDisk:
    pngs, per = sample_bytes(spec, resolution, codes_per_image, save_candidates)
    n = samples or 0
    files = CONFIG_BYTES + METRICS_BYTES + report_bytes(spec, n, resolution, pngs)
    need = max(0, per * n + files - written_bytes(task_dir))
    return TaskDisk(spec.name, samples, pngs, resolution, need)
