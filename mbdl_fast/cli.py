"""The ``mbdl-fast`` command line.

- ``mbdl-fast info``: versions, devices, and which DC-step backends run here (with the reason when not).
- ``mbdl-fast demo``: on the shipped brain slices, simulate a multi-coil acquisition, reconstruct
  zero-filled and by CG-SENSE and by accelerated DC gradient steps, time the DC step per backend,
  print a table, write a PNG figure and a JSON of the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def _info(_: argparse.Namespace) -> int:
    import numpy

    import mbdl_fast
    from mbdl_fast.data import load_brain_slices, load_natural_images

    print(f"mbdl_fast {mbdl_fast.__version__} | python {platform.python_version()} | torch {torch.__version__}"
          f" | numpy {numpy.__version__}")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    print(f"device: {device} ({name}), {torch.get_num_threads()} CPU threads")
    print("DC-step backends:")
    for backend, status in mbdl_fast.backends(device).items():
        print(f"  {backend:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    brain = load_brain_slices("all")
    print(f"shipped data: {brain.shape[0]} brain slices {tuple(brain.shape[1:])}, "
          f"{len(load_natural_images())} natural images")  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mbdl_fast.demo import run_demo

    device = torch.device(args.device) if args.device else None
    weights = Path(args.weights_dir) if args.weights_dir else None
    result = run_demo(args.num_images, device=device, out_dir=Path(args.out), weights_dir=weights)
    print(result["table"])
    print(f"wrote {result['figure']} and {result['json']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mbdl_fast.train import TrainConfig, train

    values: dict = json.loads(Path(args.config).read_text()) if args.config else {}
    for key, value in vars(args).items():
        if key in ("command", "func", "config", "quiet") or value is None:
            continue
        if key in ("model_args", "prior_args"):
            value = json.loads(value)
        values[key] = value
    cfg = TrainConfig.from_dict(values)
    result = train(cfg, progress=not args.quiet if args.quiet is not None else True)
    if result["rank"] == 0 and result["history"]:
        last = result["history"][-1]
        print(f"done: val PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.4f}; checkpoints in {cfg.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mbdl_fast.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, split=args.split, batch_size=args.batch_size, out=args.out, tol=args.tol,
                        max_iter=args.max_iter, compare=args.compare)  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    from mbdl_fast.prune.pipeline import format_table, prune_and_report

    result = prune_and_report(
        args.checkpoint, args.ratio, importance=args.importance, finetune=args.finetune, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, nm=args.nm, nm_budget=args.nm_budget, nm_score_lr=args.nm_score_lr, jac_reg=args.jac_reg, tol=args.tol,
        max_iter=args.max_iter, num_test=args.num_test, out=args.out, progress=not args.quiet,
    )  # fmt: skip
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}/model_pruned.safetensors, .json and prune_report.json")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    dirs = [Path(args.bench_dir)] if args.bench_dir else [Path(__file__).resolve().parents[1] / "bench", Path("bench")]
    script = next((d / "ladder_report.py" for d in dirs if (d / "ladder_report.py").is_file()), None)
    if script is None:
        print(f"bench: ladder_report.py not found in {[str(d) for d in dirs]}; run from a source checkout or pass "
              "--bench-dir", file=sys.stderr)  # fmt: skip
        return 2
    return subprocess.call([sys.executable, str(script), "run", "--out", args.out, "--suite", args.suite])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbdl-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="shipped DEQ and DU models on shipped brain slices; table, PNG and JSON")
    demo.add_argument("--num-images", type=int, default=4, help="test slices to reconstruct (default 4)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default="mbdl_fast_demo", help="output directory (default ./mbdl_fast_demo)")
    demo.add_argument("--weights-dir", dest="weights_dir", default=None, help="models other than the shipped ones")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a model (config file and/or flags; torchrun for data-parallel)")
    train.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    train.add_argument("--task", choices=["mri", "sr", "block-cs", "denoise"])
    train.add_argument("--model", choices=["deq", "du", "varnet", "recursion", "edsr", "dncnn", "unet"])
    train.add_argument("--prior", choices=["edsr", "dncnn", "unet"])
    train.add_argument("--model-args", dest="model_args", help="JSON, e.g. '{\"f_max_iter\": 30}'")
    train.add_argument("--prior-args", dest="prior_args", help="JSON, e.g. '{\"width\": 32}'")
    train.add_argument("--init-prior", dest="init_prior", help="checkpoint of a pre-trained prior")
    train.add_argument("--init-model", dest="init_model", help="checkpoint of the same DEQ whose weights start the run")
    for name, kind in (("size", int), ("coils", int), ("acceleration", float), ("center_fraction", float),
                       ("noise_std", float), ("sr_factor", int), ("cs_ratio", float), ("denoise_sigma", float),
                       ("max_train_items", int), ("max_val_items", int), ("epochs", int), ("batch_size", int),
                       ("lr", float), ("grad_clip", float), ("seed", int), ("jac_reg", float),
                       ("slow_reg", float), ("slow_target", float)):  # fmt: skip
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    train.add_argument("--mask-type", dest="mask_type", choices=["random", "equispaced", "uniform", "variable_density"])
    train.add_argument("--sr-kernel", dest="sr_kernel", choices=["gaussian", "bicubic", "box"])
    train.add_argument("--loss", choices=["l1", "mse", "smooth_l1"])
    train.add_argument("--out", help="output directory for checkpoints and config.json")
    train.add_argument("--device")
    train.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last")
    train.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split (sharded under torchrun)")
    ev.add_argument("checkpoint", help="checkpoint path without suffix (e.g. runs/deq/model_best) or a shipped "
                    "model's name (e.g. deq_mri_4x)")  # fmt: skip
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    ev.add_argument("--tol", type=float, default=None, help="DEQ tolerance (default: the checkpoint's own)")
    ev.add_argument("--max-iter", dest="max_iter", type=int, default=None, help="DEQ iteration cap (default: the "
                    "checkpoint's own)")  # fmt: skip
    ev.add_argument("--out", default=None, help="write the setting, summary and per-image rows as JSON here")
    ev.add_argument("--compare", default=None, help="another model's --out JSON (e.g. the dense model's): print the "
                    "paired dPSNR / dSSIM with 95%% confidence intervals and the speed ratio")  # fmt: skip
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("prune", help="prune a checkpoint, fine-tune, report dense vs pruned at equal tolerance")
    pr.add_argument("--checkpoint", required=True, help="checkpoint path without suffix (from mbdl-fast train)")
    pr.add_argument("--ratio", type=float, required=True, help="channel pruning ratio, e.g. 0.3")
    pr.add_argument("--importance", default="l1", choices=["l1", "l2", "taylor", "random"])
    pr.add_argument("--finetune", default=None, choices=["supervised", "school", "self_supervised"])
    pr.add_argument("--epochs", type=int, default=1)
    pr.add_argument("--lr", type=float, default=1e-4)
    pr.add_argument("--batch-size", dest="batch_size", type=int, default=2)
    pr.add_argument("--nm", default=None, help="one-shot N:M masks after channel pruning, e.g. 2:4")
    pr.add_argument("--nm-budget", dest="nm_budget", type=float, default=None, help="SLS N:M search MAC budget")
    pr.add_argument("--jac-reg", dest="jac_reg", type=float, default=0.0,
                    help="DEQ: weight of the Jacobian regulariser during fine-tuning (keeps the pruned DEQ converging)")  # fmt: skip
    pr.add_argument("--nm-score-lr", dest="nm_score_lr", type=float, default=0.1,
                    help="learning rate of the SLS priority scores (their own Adam group)")  # fmt: skip
    pr.add_argument("--tol", type=float, default=1e-4, help="DEQ tolerance for every timed row (default 1e-4)")
    pr.add_argument("--max-iter", dest="max_iter", type=int, default=100, help="DEQ iteration cap for every row")
    pr.add_argument("--num-test", dest="num_test", type=int, default=None, help="test images (default: all)")
    pr.add_argument("--out", default=None, help="write the pruned model and prune_report.json here")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=_prune)

    bn = sub.add_parser("bench", help="the benchmark ladder (DEQ/DU) and pruned-prior convs: Markdown, JSON, PNG")
    bn.add_argument("--out", default="bench/results/latest", help="output directory (default bench/results/latest)")
    bn.add_argument("--suite", default="all", choices=["ladder", "conv", "all"])
    bn.add_argument("--bench-dir", dest="bench_dir", default=None, help="the source checkout's bench/ directory")
    bn.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
