"""bench/gpu_check.sh --dry-run: the GPU check's logic on a machine without a GPU.

Stage order, caps, the deadline, the packing of $OUT (what the device tool can return: at most 8 files of at most
16 MiB, 2 folders deep, plain names), the reports made from what the stages wrote, the summary printed last and the
exit status, with every GPU command replaced by a stand-in (bench/gpu_check.py). Times in a dry run are scaled by 1/60.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["versions", "build", "tests_cuda_l1", "tests_cuda_l2", "tests_triton", "bench_dc_step", "bench_prox",
          "bench_conv", "bench_ladder", "bench_nm", "tests_rest"]  # fmt: skip
OUT_FILES = {"summary.md", "gpu_results.tar.gz", "gpu_logs.tar.gz"}
SCALE = 60  # dry run: 1 s stands for a minute

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "timeout", "tar")), reason="needs bash, GNU timeout and tar"
)


def dry_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run the script with --dry-run; return the process, the results folder (gpu/) and $OUT."""
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    return proc, work / "gpu", out


def stages(results: Path) -> list[dict[str, str]]:
    with (results / "stages.tsv").open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def caps() -> dict[str, float]:
    """Each stage's cap in seconds, as the script lists it."""
    listing = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    return {name: float(cap.rstrip("s")) for name, cap in (line.split() for line in listing.splitlines())}


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """Every stage, one failing and one hanging until its cap, with time enough for all."""
    return dry_run(tmp_path_factory.mktemp("gpu_check"), "--dry-fail", "tests_triton", "--dry-hang", "bench_conv",
                   "--budget", "3000")  # fmt: skip


def test_lists_the_stages_in_order_of_value():
    assert list(caps()) == STAGES


def test_stages_run_in_order_and_report_failures_and_caps(failing_run):
    proc, results, _ = failing_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = stages(results)
    assert [r["stage"] for r in rows] == STAGES
    results_by_stage = {r["stage"]: r["result"] for r in rows}
    assert results_by_stage.pop("tests_triton") == "failed (rc=1)"
    assert results_by_stage.pop("bench_conv").startswith("stopped at the cap")
    assert set(results_by_stage.values()) == {"ok"}
    conv = next(r for r in rows if r["stage"] == "bench_conv")
    cap = caps()["bench_conv"] / SCALE
    assert float(conv["cap"]) == pytest.approx(cap, abs=1e-3)
    assert cap <= float(conv["seconds"]) < cap + 1.0  # SIGINT at the cap; SIGKILL 10 s / 60 later at most
    triton = next(r for r in rows if r["stage"] == "tests_triton")
    assert "1 failed" in triton["note"]


def test_out_holds_what_the_device_tool_returns(failing_run):
    _, _, out = failing_run
    files = [p for p in out.rglob("*")]
    assert {p.name for p in files} == OUT_FILES
    assert len(files) <= 8
    for path in files:
        assert path.is_file() and path.parent == out
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
        assert path.stat().st_size <= 16 * 1024 * 1024


def test_results_archive_holds_every_stage_report(failing_run):
    _, results, out = failing_run
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = set(tar.getnames())
    expected = {"versions.txt", "gpu_settings.txt", "stages.tsv", "summary.md", "extension.txt", "dc_step_gpu.json",
                "dc_step_gpu.md", "prox_gpu.json", "prox_gpu.md", "conv/bench.json", "conv/report.md",
                "ladder/bench.json", "ladder/report.md", "ladder/report.json", "nm_gpu.json", "nm_gpu.md"}  # fmt: skip
    assert {f"gpu/{name}" for name in expected} <= names
    # the capped stage's rows were still turned into its report
    assert "3x3_64_relu" in (results / "conv" / "report.md").read_text()
    dc_table = (results / "dc_step_gpu.md").read_text()
    assert "% of copy" in dc_table and "| 8x15x320x320 | copy | 0.050 |" in dc_table and "| 100% |" in dc_table
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        logs = sorted(n for n in tar.getnames() if re.fullmatch(r"logs/\d\d_.*\.log", n))
    assert logs == [f"logs/{i:02d}_{name}.log" for i, name in enumerate(STAGES, start=1)]


def test_summary_is_printed_last_with_targets_and_settings(failing_run):
    proc, results, out = failing_run
    summary = (out / "summary.md").read_text()
    assert summary == (results / "summary.md").read_text()
    assert proc.stdout.endswith(summary)
    assert "**DRY RUN**" in summary
    assert "| DC step 8x15x320x320, cuda_l2 vs fastmri_eager | 10.00x (0.120 ms) | >= 5x | yes |" in summary
    assert "| DC step 8x15x320x320, cuda_l2 GB/s at the floor vs copy | 42% (1750 of 4200 GB/s) | >= 50% | no |" in (
        summary
    )
    assert "| DEQ ladder, + graphs vs dense eager | 4.00x, -0.05 dB, converged | >= 3x, >= -0.1 dB | yes |" in summary
    assert "Not passed: tests_triton (failed (rc=1)), bench_conv (stopped at the cap" in summary
    assert "GPU settings unchanged" in summary


def test_deadline_cuts_a_stage_and_skips_the_rest(tmp_path):
    proc, results, out = dry_run(tmp_path, "--dry-hang", "build", "--budget", "120")
    assert proc.returncode == 1
    rows = stages(results)
    assert [r["stage"] for r in rows] == STAGES
    assert rows[0]["result"] == "ok"
    assert rows[1]["result"].startswith("stopped at the deadline")
    assert float(rows[1]["seconds"]) < caps()["build"] / SCALE  # the deadline came before the cap
    assert {r["result"] for r in rows[2:]} == {"skipped: no time left"}
    assert {p.name for p in out.iterdir()} == OUT_FILES


def test_selected_stages_pass_with_exit_status_zero(tmp_path):
    proc, results, _ = dry_run(tmp_path, "--stages", "versions,bench_dc_step")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["stage"], r["result"]) for r in stages(results)] == [("versions", "ok"), ("bench_dc_step", "ok")]
    assert "All 2 stages passed." in proc.stdout
    assert "| DEQ / DU ladder | not run |" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", "tests_all"], "stage 'tests_all': expected one of versions build"),
        (["--dry-fail", "build"], "--dry-fail and --dry-hang need --dry-run"),
        (["--budget", "9m"], "--budget: expected whole seconds, got '9m'"),
        (["--fast"], "unknown argument '--fast'"),
    ],
)
def test_bad_arguments_are_named(args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_script_only_reads_the_gpu_settings_and_installs_into_its_work_folder():
    code = [re.sub(r"(^|\s)#.*", "", line) for line in SCRIPT.read_text().splitlines()]  # comments dropped
    smi = [line for line in code if re.search(r"\bnvidia-smi\s", line)]
    assert len(smi) == 1 and "--query-gpu=" in smi[0], smi
    changing = r"nvidia-smi.*\s(-pm|-pl|-ac|-rac|-lgc|-rgc|-lmc|-rmc|-r|-c|-mig|-e|--persistence-mode|--power-limit)\b"
    assert not any(re.search(changing, line) for line in code)
    pip_installs = [line for line in code if "pip install" in line]
    assert pip_installs and all("--target" in line for line in pip_installs), pip_installs
