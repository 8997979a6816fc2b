import json

import pytest

from mbdl_fast.cli import main


def test_info_reports_backends_and_data(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch   yes" in out
    assert "shipped data: 58 brain slices" in out


def test_demo_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    args = ["demo", "--num-images", "2", "--size", "64", "--coils", "4", "--iterations", "20", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"zero-filled", "CG-SENSE", "DC steps (Nesterov)"}
    # the iterative reconstructions beat zero-filling on noise-free data
    assert rows["CG-SENSE"]["psnr"] > rows["zero-filled"]["psnr"] + 1
    assert rows["DC steps (Nesterov)"]["psnr"] > rows["zero-filled"]["psnr"] + 1
    assert result["dc_step_seconds"]["torch"] > 0
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PSNR" in capsys.readouterr().out


def test_bad_command_is_refused():
    with pytest.raises(SystemExit):
        main(["reconstruct"])
