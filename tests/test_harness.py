"""The benchmark harness at a world size other than two: `compare.py --interleaved --nproc 4 --tiny` runs
every paracompile mesh of 4 ranks in one process group (benchmarks/rounds.py), in interleaved rounds, and
each output matches the 1-rank eager output of the same model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # four ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interleaved_rounds_on_four_ranks(tmp_path):
    # Ulysses 4 itself runs in tests/test_toy_dit.py and tests/test_diffusers_models.py; here the meshes that
    # need a ring of 4 ranks or two mesh dims.
    setups = ["eager1", "pc_ring", "pc_u2r2"]
    command = [sys.executable, os.path.join(REPO, "benchmarks", "compare.py"), "--interleaved", "--nproc", "4",
               "--tiny", "--workload", "flux", "--setups", ",".join(setups), "--rounds", "2", "--steps", "1",
               "--warmup", "1", "--out", str(tmp_path)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    report = json.loads((tmp_path / "rounds_flux_tiny.json").read_text())
    assert report["meta"]["world_size"] == 4
    for name in setups:
        result = report["results"][name]
        assert "error" not in result, result.get("error")
        assert len(result["round_medians_ms"]) == 2, result
        assert result["interleaved_warmup_s"] >= 0, result
        assert result["max_abs_diff_vs_eager1"] <= 1e-4, (name, result["max_abs_diff_vs_eager1"])
    assert report["results"]["pc_u2r2"]["options"]["mesh"] == {"ulysses": 2, "ring": 2}
    assert (tmp_path / "rounds_flux_tiny.md").read_text().count("| pc_") == 2
