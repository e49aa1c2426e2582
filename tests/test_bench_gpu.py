"""bench/gpu.py on the CPU (tiny configs, a few steps): every section runs, so the GPU check
does not rot between the times a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _pythonpath import pythonpath

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_CPU = {"ldm_fsdp", "compiled"}  # CUDA only


def test_gpu_bench_runs_every_section_on_the_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--device", "cpu", "--out", str(tmp_path),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    s = results["sections"]
    failed = {name for name, body in s.items() if "error" in body}
    failed |= {f"{name}.{item}" for name, body in s.items() for item, v in body.items() if isinstance(v, dict) and "error" in v}
    assert failed == NOT_ON_CPU, {k: s[k] for k in failed if k in s}  # every section ran but what needs CUDA
    for name in ("biqa", "constyle", "restorer", "ldm", "scm"):
        r = s["stages"][name]
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["tflop_per_step"] > 0, name
    assert s["stages"]["biqa"]["plain_loop_step_s"] > 0  # the BIQA goal's reference loop
    assert s["degrader"]["2x3x64x64"]["images_per_s"] > 0
    assert 0 < s["loader"]["busy_fraction"] <= 1 and s["loader"]["step_s"] > 0
    assert all(v["exit"] == 0 for v in s["commands"].values()) and len(s["commands"]) == 3
    assert s["tiny_restorer"]["steps"] > 0 and set(s["tiny_restorer"]["gain_per_type"]) >= {"noise", "blur"}
    assert "| stages | ldm |" in out.stdout  # the printed table
    assert (tmp_path / "gpu.md").read_text() in out.stdout  # and the one written
