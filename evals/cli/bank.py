"""`cm3eval bank build|search`: retrieval memory banks on disk.

build reads documents from
  - a COCO root in the official layout (`--coco-root DIR`, `--split train2014`):
    DIR/annotations/captions_train2014.json and the images in DIR/train2014/ (CM3leon's memory bank
    for the COCO tasks; the val2014 prompts are never in it);
  - JSONL: one object per line with "text" (or "caption") and/or "image" (or "image_path", relative
    to --image-root), optional "id" (default: the line number); other keys go to the doc's meta;
  - a COCO captions file ({"images": [...], "annotations": [...]}): one document per caption,
    id = the annotation id, image = the image's file_name under --image-root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import typer

from cm3leon.errors import Cm3evalError
from evals.errors import OneLineErrors, exit_with

if TYPE_CHECKING:
    from cm3leon.retrieval import RetrievalDoc

bank_app = typer.Typer(cls=OneLineErrors, help="Retrieval memory banks: build one from documents, search one.", no_args_is_help=True)


def _fail(msg: str) -> None:
    exit_with(Cm3evalError(msg))


def _jsonl_docs(path: Path, with_images: bool) -> Iterator["RetrievalDoc"]:
    from cm3leon.retrieval import RetrievalDoc

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            text = obj.pop("text", None) if "text" in obj else obj.pop("caption", None)
            image = obj.pop("image", None) if "image" in obj else obj.pop("image_path", None)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}:{n}: 'text' must be a string")
            if image is not None and not isinstance(image, str):
                raise ValueError(f"{path}:{n}: 'image' must be a path string")
            image = image if with_images else None
            if text is None and image is None:
                raise ValueError(f"{path}:{n}: a document needs 'text' or 'image'")
            yield RetrievalDoc(id=str(obj.pop("id", n)), text=text, image_path=image, meta=obj)


def _coco_docs(path: Path, data: dict, with_images: bool) -> list["RetrievalDoc"]:
    from cm3leon.retrieval import RetrievalDoc

    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        docs = []
        for ann in data["annotations"]:
            if ann["image_id"] not in files:
                raise ValueError(f"{path}: annotation {ann['id']} names image_id {ann['image_id']}, not in 'images'")
            docs.append(RetrievalDoc(id=str(ann["id"]), text=ann["caption"].strip(),
                                     image_path=files[ann["image_id"]] if with_images else None,
                                     meta={"image_id": ann["image_id"]}))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file (missing {e})") from None
    return docs


def read_docs(path: Path, with_images: bool = True) -> list["RetrievalDoc"] | Iterator["RetrievalDoc"]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: documents file not found")
    if path.suffix == ".jsonl":
        return _jsonl_docs(path, with_images)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: bad JSON ({e.msg}, line {e.lineno}); expected .jsonl documents or COCO captions JSON") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO captions file with 'images' and 'annotations' (or a .jsonl)")
    return _coco_docs(path, data, with_images)


def _encoder(spec: str):
    """The one resolver of encoder names (evals/encoders.py): open_clip:ARCH:PATH, an HF CLIP folder,
    native:PATH, demo. Nothing here requires an encoder inside a model folder."""
    from evals.encoders import resolve_encoder

    return resolve_encoder(spec, flag="--encoder")


def coco_captions(coco_root: Path, split: str) -> tuple[Path, Path]:
    """(captions file, image folder) of a COCO root in the official layout, or a one-line error."""
    ann = coco_root / "annotations" / f"captions_{split}.json"
    images = coco_root / split
    for path, what in ((ann, "captions file"), (images, "image folder")):
        if not path.exists():
            raise FileNotFoundError(
                f"COCO {what} not found: {path} (the official layout: {coco_root}/annotations/captions_{split}.json "
                f"and {coco_root}/{split}/; get them from https://cocodataset.org/#download)")
    return ann, images


def _progress_lines(total: int | None):
    """A progress callback for MemoryBank.build: one stderr line about every 5 % (stdout stays --json)."""
    state = {"done": 0, "shown": 0}
    step = max(1, (total or 20_000) // 20)

    def advance(n: int) -> None:
        state["done"] += n
        if state["done"] - state["shown"] >= step or state["done"] == total:
            state["shown"] = state["done"]
            typer.echo(f"encoded {state['done']}" + (f"/{total}" if total else "") + " documents", err=True)

    return advance


_BUILD_ERRORS = (Cm3evalError, FileNotFoundError, FileExistsError, ValueError, ImportError)


@bank_app.command()
def build(
    out: Path = typer.Option(..., help="bank folder to create"),
    encoder: str = typer.Option(..., help="open_clip:ARCH:PATH | an HF CLIP folder | native:PATH | demo"),
    coco_root: Path = typer.Option(None, help="COCO root in the official layout (annotations/, train2014/)"),
    split: str = typer.Option("train2014", help="with --coco-root: the split whose captions and images go in"),
    docs: Path = typer.Option(None, help="documents instead: .jsonl or a COCO captions .json"),
    image_root: Path = typer.Option(None, help="with --docs: folder the image paths are relative to "
                                               "(default: the docs file's folder)"),
    batch_size: int = typer.Option(256, min=1),
    limit: int = typer.Option(None, min=1, help="only the first N documents (a quick bank)"),
    no_images: bool = typer.Option(False, "--no-images", help="text only (e.g. captions whose images are absent)"),
    json_out: bool = typer.Option(False, "--json", help="print the bank summary as JSON"),
) -> None:
    """Encode documents into a memory bank folder (embeddings.npy float16, meta.jsonl, bank.json)."""
    from cm3leon.retrieval import MemoryBank

    if (coco_root is None) == (docs is None):
        _fail("give one of --coco-root DIR (official COCO layout) or --docs FILE")
    try:
        if coco_root is not None:
            docs, root = coco_captions(coco_root, split)
        else:
            root = image_root or docs.parent
        items = read_docs(docs, not no_images)
        if limit is not None:
            items = list(items)[:limit]
        enc = _encoder(encoder)
        total = len(items) if isinstance(items, list) else None
        bank = MemoryBank.build(items, enc, batch_size=batch_size, out_dir=out, image_root=root,
                                progress=_progress_lines(total))
    except _BUILD_ERRORS as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    summary = {"bank": str(out), "count": len(bank), "dim": bank.dim, "encoder": bank.fingerprint, "hash": bank.content_hash}
    typer.echo(json.dumps(summary) if json_out else
               f"{summary['count']} documents, {summary['dim']}-d, encoder {summary['encoder']} -> {out}")


@bank_app.command()
def search(
    bank: Path = typer.Argument(..., help="bank folder"),
    encoder: str = typer.Option(..., help="the encoder the bank was built with (same spec as build)"),
    text: str = typer.Option(None, help="query text"),
    image: Path = typer.Option(None, help="query image"),
    k: int = typer.Option(5, "-k", "--k", min=1),
    select: bool = typer.Option(False, "--select", help="apply CM3leon's selection (modality, diversity) instead of raw top-k"),
    max_similarity: float = typer.Option(0.9, help="--select: skip docs more similar than this to the query or a pick"),
    image_root: Path = typer.Option(None, help="override the bank's image root"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Query a bank with text and/or an image."""
    from cm3leon.retrieval import MemoryBank, Retriever, RetrievalDoc, SelectionConfig, load_image

    if text is None and image is None:
        _fail("give --text and/or --image")
    try:
        b = MemoryBank.load(bank, image_root=image_root)
        enc = _encoder(encoder)
        b.check_encoder(enc)
        query = RetrievalDoc(id="<query>", text=text, image=load_image(image, "--image") if image else None)
        retriever = Retriever(b, enc, SelectionConfig(k=k, max_similarity=max_similarity))
        if select:
            rows = retriever.select(retriever.query_vectors([query]), k, [set()])[0]
        else:
            scores, idx = b.search(retriever.query_vectors([query]), k)
            rows = list(zip(idx[0].tolist(), scores[0].tolist()))
    except _BUILD_ERRORS as e:
        _fail(str(e))
    hits = []
    for rank, (row, score) in enumerate(rows, 1):
        rec = b.record(row)
        hits.append({"rank": rank, "score": round(score, 6), "row": row, "id": rec["id"],
                     "text": rec.get("text"), "image": rec.get("image")})
    if json_out:
        typer.echo(json.dumps({"bank": str(bank), "query": {"text": text, "image": str(image) if image else None}, "hits": hits}))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("rank", "score", "id", "text", "image")
    for h in hits:
        table.add_row(str(h["rank"]), f"{h['score']:.4f}", escape(h["id"]), escape(h["text"] or ""), escape(h["image"] or ""))
    Console().print(table)
