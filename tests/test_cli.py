import json

import pytest
import torch

from mbdl_fast.cli import main


def test_info_reports_backends_and_data(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch   yes" in out
    assert "shipped data: 58 brain slices" in out


def test_demo_with_missing_weights_names_them(tmp_path, capsys):
    assert main(["demo", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "deq_mri_4x" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="deq_mri_4x"):  # --debug: the exception itself
        main(["demo", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--debug"])


def test_bad_command_is_refused():
    with pytest.raises(SystemExit):
        main(["reconstruct"])


@pytest.mark.parametrize(
    ("argv", "flag", "expected"),
    [
        (["train", "--batch-size", "0"], "--batch-size", "expected an int >= 1, got 0"),
        (["train", "--grad-clip", "-1"], "--grad-clip", "expected a finite real >= 0"),
        (["train", "--lr", "nan"], "--lr", "expected a finite real > 0, got nan"),
        (["train", "--task", "denoise", "--model", "deq"], "--model", "task 'denoise' trains one of"),
        (["train", "--model-args", "{bad"], "--model-args", "expected a JSON object"),
        (["train", "--prior-args", "[1]"], "--prior-args", "expected a JSON object"),
        (["train", "--config", "/no/such/config.json"], "--config", "cannot read /no/such/config.json"),
        (["train", "--size", "31", "--task", "denoise", "--model", "edsr"], "--size", "expected an even int"),
        (["demo", "--num-images", "0"], "--num-images", "expected an int >= 1, got '0'"),
        (["eval", "varnet_mri_4x", "--batch-size", "0"], "--batch-size", "expected an int >= 1, got '0'"),
        (["eval", "/no/such/checkpoint"], "/no/such/checkpoint.json", "no such checkpoint config"),
    ],
)
def test_user_errors_are_one_line_naming_the_flag(argv, flag, expected, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals (types, choices)
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0] and expected in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: --device cuda is valid here")
def test_device_without_gpu_is_one_line(capsys):
    for argv in (["demo", "--device", "cuda"], ["train", "--device", "cuda:0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--device: expected an available device" in err and "no CUDA device" in err


def test_debug_shows_the_exception():
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        main(["train", "--batch-size", "0", "--debug"])
    with pytest.raises(ValueError, match="batch_size"):
        main(["--debug", "train", "--batch-size", "0"])


def test_help_shows_defaults(capsys):
    for command, shown in (("demo", "(default: 4)"), ("train", "(default: 0.001)"), ("eval", "(default: test)")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert shown in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("info", "demo", "train", "eval", "prune", "bench"))


def test_shipped_model_names_are_checkpoints(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["eval", "varnet_mri_4x", "--split", "val", "--out", str(out)]) == 0
    assert "varnet_mri_4x" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["psnr"] > 25 for r in rows)


def test_info_says_which_cuda_levels_were_built(capsys):
    from mbdl_fast.cuda_extension import build_report

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part, built, detail in build_report():
        assert f"{part}: {detail}" in out
        assert detail.startswith("built" if built else "not built")
