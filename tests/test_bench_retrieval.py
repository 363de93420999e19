"""`cm3eval bench retrieval`, run tiny: the JSON keys, and search results equal brute force."""

from __future__ import annotations

import json

import numpy as np
import torch
import typer
from typer.testing import CliRunner

from cm3leon.retrieval import MemoryBank
from evals.bench.retrieval import command


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def test_bench_retrieval_tiny(tmp_path):
    args = ["--n", "20000", "--dim", "64", "--queries", "50", "--k", "10", "--repeats", "1",
            "--cache-dir", str(tmp_path / "bank"), "--json"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    for key in ("queries_per_s", "ratio_to_matmul", "matmul_queries_per_s", "peak_rss_mb", "matches_brute_force"):
        assert key in out, key
    assert out["queries_per_s"] > 0 and out["ratio_to_matmul"] > 0 and out["peak_rss_mb"] > 0
    assert out["matches_brute_force"] is True and out["bank_reused"] is False
    if "faiss_s" in out:
        assert out["faiss_matches_brute_force"] is True

    # the bank it wrote is a valid bank of unit vectors, and search over it equals brute force here too
    bank = MemoryBank.load(tmp_path / "bank", verify_hash=True)
    assert len(bank) == 20000 and bank.dim == 64
    emb = np.asarray(bank.embeddings, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    q = torch.nn.functional.normalize(torch.randn(9, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    ref = torch.topk(q.double() @ torch.from_numpy(emb).t(), 10, dim=1)
    scores, rows = bank.search(q, 10, chunk_rows=3000)
    assert torch.equal(rows, ref.indices)

    # a second run reuses the bank on disk
    res = CliRunner().invoke(_app(), args + ["--no-faiss"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["bank_reused"] is True
