"""`cm3eval bank build|search`: retrieval memory banks on disk.

build reads documents from
  - JSONL: one object per line with "text" (or "caption") and/or "image" (or "image_path", relative
    to --image-root), optional "id" (default: the line number); other keys go to the doc's meta;
  - a COCO captions file ({"images": [...], "annotations": [...]}): one document per caption,
    id = the annotation id, image = the image's file_name under --image-root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import typer

from cm3leon.encoder import load_encoder
from cm3leon.retrieval import MemoryBank, Retriever, RetrievalDoc, SelectionConfig, load_image

bank_app = typer.Typer(help="Retrieval memory banks: build one from documents, search one.", no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _jsonl_docs(path: Path, with_images: bool) -> Iterator[RetrievalDoc]:
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


def _coco_docs(path: Path, data: dict, with_images: bool) -> list[RetrievalDoc]:
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


def read_docs(path: Path, with_images: bool = True) -> list[RetrievalDoc] | Iterator[RetrievalDoc]:
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


@bank_app.command()
def build(
    docs: Path = typer.Option(..., help="documents: .jsonl or a COCO captions .json"),
    encoder: str = typer.Option(..., help="native:PATH | open_clip:ARCH:PATH | hf-clip:DIR"),
    out: Path = typer.Option(..., help="bank folder to create"),
    image_root: Path = typer.Option(None, help="folder the image paths are relative to (default: the docs file's folder)"),
    batch_size: int = typer.Option(256, min=1),
    no_images: bool = typer.Option(False, "--no-images", help="text only (e.g. captions whose images are absent)"),
    json_out: bool = typer.Option(False, "--json", help="print the bank summary as JSON"),
) -> None:
    """Encode documents into a memory bank folder (embeddings.npy float16, meta.jsonl, bank.json)."""
    root = image_root or docs.parent
    try:
        enc = load_encoder(encoder)
        bank = MemoryBank.build(read_docs(docs, not no_images), enc, batch_size=batch_size, out_dir=out, image_root=root)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        _fail(str(e))
    summary = {"bank": str(out), "count": len(bank), "dim": bank.dim, "encoder": bank.fingerprint, "hash": bank.content_hash}
    typer.echo(json.dumps(summary) if json_out else
               f"{summary['count']} documents, {summary['dim']}-d, encoder {summary['encoder']} -> {out}")


@bank_app.command()
def search(
    bank: Path = typer.Argument(..., help="bank folder"),
    encoder: str = typer.Option(..., help="the encoder the bank was built with"),
    text: str = typer.Option(None, help="query text"),
    image: Path = typer.Option(None, help="query image"),
    k: int = typer.Option(5, "-k", "--k", min=1),
    select: bool = typer.Option(False, "--select", help="apply CM3leon's selection (modality, diversity) instead of raw top-k"),
    max_similarity: float = typer.Option(0.9, help="--select: skip docs more similar than this to the query or a pick"),
    image_root: Path = typer.Option(None, help="override the bank's image root"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Query a bank with text and/or an image."""
    if text is None and image is None:
        _fail("give --text and/or --image")
    try:
        b = MemoryBank.load(bank, image_root=image_root)
        enc = load_encoder(encoder)
        b.check_encoder(enc)
        query = RetrievalDoc(id="<query>", text=text, image=load_image(image, "--image") if image else None)
        retriever = Retriever(b, enc, SelectionConfig(k=k, max_similarity=max_similarity))
        if select:
            rows = retriever.select(retriever.query_vectors([query]), k, [set()])[0]
        else:
            scores, idx = b.search(retriever.query_vectors([query]), k)
            rows = list(zip(idx[0].tolist(), scores[0].tolist()))
    except (FileNotFoundError, ValueError, ImportError) as e:
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
