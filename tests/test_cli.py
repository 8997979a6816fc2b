import pytest

from mbdl_fast.cli import main


def test_info_reports_backends_and_data(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch   yes" in out
    assert "shipped data: 58 brain slices" in out


def test_demo_with_missing_weights_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="deq_mri_4x"):
        main(["demo", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_bad_command_is_refused():
    with pytest.raises(SystemExit):
        main(["reconstruct"])
