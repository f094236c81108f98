"""The GPU check's CPU dry run (DEVICE=cpu SMALL=1 scripts/gpu_check.sh): every section runs
and its report holds what BENCHMARKS.md says it holds."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_dry_run_writes_the_whole_report(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "OUT": str(out), "PY": sys.executable,
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["ok"], {k: s["error"] for k, s in report["sections"].items()}
    sections = report["sections"]
    assert list(sections) == ["precision", "epochs", "ddp", "jpeg", "benchmark", "latency"]  # compile: --small
    assert [r["method"] for r in sections["precision"]["result"]] == ["kd", "crd"]
    for row in sections["precision"]["result"]:
        for dtype in ("bf16", "fp16"):
            assert row[dtype]["finite"] and row[dtype]["grad_cosine"] > 0.98, (row["method"], dtype)
    assert all(r["images_per_s"] > 0 for r in sections["epochs"]["result"])
    ddp = sections["ddp"]["result"]
    assert ddp["backend"] == "gloo"
    stages = {(r["method"], s["stage"]): s for r in ddp["steps"] for s in r["stages"]}
    assert set(stages) == {("crd", "main"), ("ft", "init_ft"), ("ft", "main"), ("kd", "main"), ("reviewkd", "main")}
    assert all(s["loss_rel_diff"] < 1e-6 and s["grad_max_abs_diff"] < 1e-6 for s in stages.values())
    jpeg = sections["jpeg"]["result"]
    assert jpeg["max_pixel_diff_device_vs_cpu"] == 0 and jpeg["files"] >= 3 and jpeg["loader_images"] > 0
    bench = sections["benchmark"]["result"]
    assert bench["meta"]["nce_k"] == 63 and bench["results"][0]["method"] == "crd"
    assert sections["latency"]["result"]["cpu_latency_ms_b1"] > 0
    assert all(s["seconds"] > 0 for s in sections.values())
