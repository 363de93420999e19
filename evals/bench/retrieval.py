"""`cm3eval bench retrieval`: exact top-k over a memory-mapped float16 bank, beside raw matmul.

A random bank of unit vectors (default 1M x 512, ~1 GB) is written once in chunks to a temp
folder (reused by later runs) and loaded memory-mapped. We time MemoryBank.search (chunked fp16 ->
fp32 GEMM + running top-k) and, in the same run on the same data, the matmul alone: the fp32 bank
already in RAM times the same queries, with no conversion and no top-k. ratio = ours / matmul
(queries/s); 1.0 means search costs nothing beyond the GEMM. faiss' IndexFlatIP too when installed.
Results are checked against brute force on a subset of the queries.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer

if TYPE_CHECKING:  # numpy, torch and the bank load inside the functions: `cm3eval --help` stays fast
    import torch

    from cm3leon.retrieval import MemoryBank

_FINGERPRINT = "random-normal:seed0"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ensure_bank(folder: Path, n: int, dim: int, chunk: int = 65536, seed: int = 0) -> tuple["MemoryBank", bool, float]:
    """Load the cached random bank, or write it (chunk by chunk: never more than one chunk in RAM)."""
    import numpy as np

    from cm3leon.retrieval import MemoryBank

    try:
        bank = MemoryBank.load(folder)
        if bank.fingerprint == _FINGERPRINT and len(bank) == n and bank.dim == dim:
            return bank, True, 0.0
    except (FileNotFoundError, ValueError):
        pass
    if folder.exists():  # stale or partial: start over
        for name in ("bank.json", "embeddings.npy", "meta.jsonl"):
            (folder / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    bank = MemoryBank.create(folder, _FINGERPRINT, dim, encoder_name="random")
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        v = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        bank.add_vectors(v)
    bank.flush()
    return bank, False, time.perf_counter() - t0


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _agrees(scores: "torch.Tensor", rows: "torch.Tensor", ref_s: "torch.Tensor", ref_i: "torch.Tensor",
            atol: float = 1e-4) -> bool:
    """Same top-k as brute force: equal scores everywhere, equal rows wherever the score is not tied."""
    import torch

    if scores.shape != ref_s.shape or not torch.allclose(scores, ref_s, atol=atol, rtol=0):
        return False
    for q in range(len(rows)):
        diff = rows[q] != ref_i[q]
        if diff.any():
            # a differing row is only allowed at a tie with its neighbour in the reference list
            s = ref_s[q]
            tied = torch.zeros_like(diff)
            tied[1:] |= (s[1:] - s[:-1]).abs() < atol
            tied[:-1] |= (s[1:] - s[:-1]).abs() < atol
            if (diff & ~tied).any():
                return False
    return True


def _matmul_only(bank: "MemoryBank", q: "torch.Tensor", chunk_rows: int) -> tuple[Callable[[], None], "torch.Tensor"]:
    """The GEMM alone: the same vectors as fp32 already in RAM, the same queries, GEMMs of the same
    width written into one reused buffer (no conversion, no top-k). Returns (timed fn, fp32 bank)."""
    import numpy as np
    import torch

    emb32 = torch.from_numpy(np.asarray(bank.embeddings, dtype=np.float32))
    n, queries = len(emb32), len(q)
    width = max(1024, min(chunk_rows, (1 << 26) // max(1, queries)))
    buf = torch.empty(queries, width)

    def run() -> None:
        for s in range(0, n, width):
            block = emb32[s : s + width]
            out = buf if len(block) == width else torch.empty(queries, len(block))
            torch.mm(q, block.t(), out=out)

    return run, emb32


def _faiss_times(bank: "MemoryBank", q: "torch.Tensor", k: int, chunk_rows: int, repeats: int, check: int,
                 t_mm: float, ref: tuple) -> dict[str, Any]:
    try:
        import faiss as _faiss  # noqa: F401
    except ImportError:
        return {"faiss": "not installed (pip install 'cm3eval[faiss]')"}
    t0 = time.perf_counter()
    bank.search(q[:1], k, backend="faiss", chunk_rows=chunk_rows)  # builds the index
    build_s = time.perf_counter() - t0
    t_f = _best(lambda: bank.search(q, k, backend="faiss"), repeats)
    fs, fi = bank.search(q[:check], k, backend="faiss")
    return {"faiss_build_s": build_s, "faiss_queries_per_s": len(q) / t_f, "faiss_s": t_f,
            "faiss_ratio_to_matmul": t_mm / t_f, "faiss_matches_brute_force": _agrees(fs, fi, *ref)}


def measure(n: int, dim: int, queries: int, k: int, repeats: int, chunk_rows: int, cache_dir: Path | None,
            faiss: bool, check: int) -> dict[str, Any]:
    """Every number of the benchmark, as one dict (what --json prints)."""
    import torch

    rss_start = _rss_mb()  # the interpreter + torch before any bank work
    folder = cache_dir or Path(tempfile.gettempdir()) / f"cm3eval-bench-bank-{n}x{dim}"
    bank, reused, gen_s = ensure_bank(folder, n, dim)
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    bank.search(q[:8], k, backend="torch", chunk_rows=chunk_rows)  # warm-up: page cache, thread pool
    t_ours = _best(lambda: bank.search(q, k, backend="torch", chunk_rows=chunk_rows), repeats)
    scores, rows = bank.search(q[:check], k, backend="torch", chunk_rows=chunk_rows)
    rss_search = _rss_mb()
    matmul_only, emb32 = _matmul_only(bank, q, chunk_rows)
    t_mm = _best(matmul_only, repeats)
    ref = torch.topk(q[:check] @ emb32.t(), min(k, n), dim=1)
    ok = _agrees(scores, rows, *ref)
    del emb32, matmul_only
    res: dict[str, Any] = {
        "n": n, "dim": dim, "queries": queries, "k": k, "threads": torch.get_num_threads(),
        "bank": str(folder), "bank_reused": reused, "bank_write_s": round(gen_s, 2), "bank_bytes": int(n * dim * 2),
        "queries_per_s": queries / t_ours, "search_s": t_ours,
        "matmul_queries_per_s": queries / t_mm, "matmul_s": t_mm, "ratio_to_matmul": t_mm / t_ours,
        "matmul_gflops": 2 * queries * n * dim / t_mm / 1e9, "matches_brute_force": ok,
        "peak_rss_mb_start": round(rss_start, 1), "peak_rss_mb_search": round(rss_search, 1),
    }
    if faiss:
        res.update(_faiss_times(bank, q, k, chunk_rows, repeats, check, t_mm, (ref[0], ref[1])))
    res["peak_rss_mb"] = round(_rss_mb(), 1)
    return res


def _print_table(res: dict[str, Any]) -> None:
    n, k, folder = res["n"], res["k"], res["bank"]
    written = "reused" if res["bank_reused"] else f"written in {res['bank_write_s']:.1f} s"
    print(f"bank {n:,} x {res['dim']} float16 ({res['bank_bytes'] / 2**20:,.0f} MiB) at {folder}"
          f" ({written}); {res['queries']} queries, k={k}, {res['threads']} threads")
    print(f"{'':28}{'queries/s':>12}{'seconds':>10}{'vs matmul':>11}")
    print(f"{'MemoryBank.search (torch)':28}{res['queries_per_s']:12.1f}{res['search_s']:10.3f}{res['ratio_to_matmul']:11.2f}")
    print(f"{'matmul only (fp32 in RAM)':28}{res['matmul_queries_per_s']:12.1f}{res['matmul_s']:10.3f}{1.0:11.2f}"
          f"   ({res['matmul_gflops']:.1f} GFLOP/s)")
    if "faiss_s" in res:
        print(f"{'faiss IndexFlatIP':28}{res['faiss_queries_per_s']:12.1f}{res['faiss_s']:10.3f}"
              f"{res['faiss_ratio_to_matmul']:11.2f}   (index build {res['faiss_build_s']:.1f} s)")
    elif "faiss" in res:
        print(f"faiss: {res['faiss']}")
    print(f"top-{k} equals brute force on {res['checked']} queries: "
          f"torch {res['matches_brute_force']}"
          + (f", faiss {res['faiss_matches_brute_force']}" if "faiss_s" in res else ""))
    print(f"peak RSS: {res['peak_rss_mb_start']:,.0f} MiB at start, {res['peak_rss_mb_search']:,.0f} MiB after search "
          f"(mapped bank pages count), {res['peak_rss_mb']:,.0f} MiB at the end (fp32 copies for matmul/faiss)")


def command(
    n: int = typer.Option(1_000_000, help="bank rows"),
    dim: int = typer.Option(512, help="vector dimension (CLIP ViT-B-32: 512)"),
    queries: int = typer.Option(1000, help="queries per search call"),
    k: int = typer.Option(10, help="top-k"),
    repeats: int = typer.Option(2, help="timed repeats; the best counts"),
    chunk_rows: int = typer.Option(65536, help="bank rows per GEMM in MemoryBank.search"),
    cache_dir: Path = typer.Option(None, help="where the random bank is kept (default: a folder in the temp dir)"),
    faiss: bool = typer.Option(True, help="also time faiss IndexFlatIP when installed"),
    check: int = typer.Option(50, help="queries checked against brute force"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Memory-bank search speed: queries/s vs the raw matmul on the same data, peak memory, faiss."""
    res = measure(n, dim, queries, k, repeats, chunk_rows, cache_dir, faiss, check)
    res["checked"] = min(check, queries)
    if json_out:
        print(json.dumps(res))
        return
    _print_table(res)
