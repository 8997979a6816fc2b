"""mbdl-fast: fast model-based deep learning (DEQ, deep unfolding) for MRI, super-resolution and compressive sensing.

Commands: ``info`` (versions, devices, backends, which CUDA levels were built), ``demo`` (the shipped models on
shipped brain slices: table, PNG, JSON), ``train``, ``eval``, ``prune`` (dense vs pruned at equal tolerance) and
``bench`` (the benchmark ladder). Wherever a checkpoint is asked for, a shipped model name (``deq_mri_4x``, ...)
will do.

A user error (a bad flag value, a missing file, a device that is not there) ends in one line on stderr naming the
flag and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy
import torch

import mbdl_fast
from mbdl_fast._validate import check_device
from mbdl_fast.adapt_real import (
    ADAPT_JAC_REG,
    ADAPT_LR,
    ADAPT_PATIENCE,
    ADAPT_STEPS,
    ADAPT_STRATEGIES,
    adapt_checkpoint,
)
from mbdl_fast.cuda_extension import build_report
from mbdl_fast.data import load_brain_slices, load_natural_images
from mbdl_fast.demo import run_demo
from mbdl_fast.demo_real import run_real_demo
from mbdl_fast.evaluate import evaluate_checkpoint
from mbdl_fast.physics.superres import KERNELS as SR_KERNELS
from mbdl_fast.prune.pipeline import format_table, prune_and_report
from mbdl_fast.tasks import TrainConfig
from mbdl_fast.train import train

#: Errors a user's input raises (bad values, files, devices, missing optional packages): one line, exit status 2.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where there is none (None: the value comes from elsewhere, e.g. a config file)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return text
        if "default" in text:  # the help states it already
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Defaults in --help, ``--debug`` on every (sub)command, and a parse error as one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        default = kwargs.get("default")
        if not kwargs.get("help") and default is not None and not isinstance(default, bool):
            kwargs["help"] = "(default: %(default)s)"  # argparse shows defaults only beside a help text
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (the argument dicts of --model-args, --prior-args)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"width\": 32}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 32}}', got {text!r}")
    return value


def _info(_: argparse.Namespace) -> int:
    print(f"mbdl_fast {mbdl_fast.__version__} | python {platform.python_version()} | torch {torch.__version__}"
          f" | numpy {numpy.__version__}")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    print(f"device: {device} ({name}), {torch.get_num_threads()} CPU threads")
    print("DC-step backends:")
    for backend, status in mbdl_fast.backends(device).items():
        print(f"  {backend:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    print("built here:")
    for part, _, detail in build_report():
        print(f"  {part}: {detail}")
    brain = load_brain_slices("all")
    print(f"shipped data: {brain.shape[0]} brain slices {tuple(brain.shape[1:])}, "
          f"{len(load_natural_images())} natural images")  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    device = check_device("device", args.device) if args.device else None
    weights = Path(args.weights_dir) if args.weights_dir else None
    if args.data == "real":
        result = run_real_demo(device=device, out_dir=Path(args.out), weights_dir=weights)
        print(result["table"])
        print(f"wrote {', '.join(result['figures'])} and {result['json']}")
        return 0
    result = run_demo(args.num_images, device=device, out_dir=Path(args.out), weights_dir=weights)
    print(result["table"])
    print(f"wrote {result['figure']} and {result['json']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    values: dict = _read_config(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key in ("command", "func", "config", "quiet", "debug") or value is None:
            continue
        values[key] = value
    cfg = TrainConfig.from_dict(values)
    result = train(cfg, progress=not args.quiet if args.quiet is not None else True)
    if result["rank"] == 0 and result["history"]:
        last = result["history"][-1]
        print(f"done: val PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.4f}; checkpoints in {cfg.out}")
    return 0


def _read_config(path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"config: cannot read {path} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config: {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config: expected a JSON object of TrainConfig fields in {path}, got {type(values).__name__}")
    return values


def _eval(args: argparse.Namespace) -> int:
    evaluate_checkpoint(args.checkpoint, split=args.split, batch_size=args.batch_size, out=args.out, tol=args.tol,
                        max_iter=args.max_iter, compare=args.compare)  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    result = prune_and_report(
        args.checkpoint, args.ratio, importance=args.importance, finetune=args.finetune, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, nm=args.nm, nm_budget=args.nm_budget, nm_score_lr=args.nm_score_lr, jac_reg=args.jac_reg, tol=args.tol,
        max_iter=args.max_iter, num_test=args.num_test, out=args.out, progress=not args.quiet,
    )  # fmt: skip
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}/model_pruned.safetensors, .json and prune_report.json")
    return 0


def _adapt_real(args: argparse.Namespace) -> int:
    result = adapt_checkpoint(
        args.checkpoint, args.out, args.setting, strategy=args.strategy, steps=args.steps, lr=args.lr,
        jac_reg=args.jac_reg, patience=args.patience, seed=args.seed, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    final = result["final"]
    solved = f", {final['iterations']:.0f} it., converged {final['converged']:.0%}" if "iterations" in final else ""
    print(f"kept step {result['best_step'] + 1} of {len(result['history'])}: validation error "
          f"{final['validation_error']:.5f}{solved}; wrote {args.out}.safetensors and .json")  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
    dirs = [Path(args.bench_dir)] if args.bench_dir else [Path(__file__).resolve().parents[1] / "bench", Path("bench")]
    script = next((d / "ladder_report.py" for d in dirs if (d / "ladder_report.py").is_file()), None)
    if script is None:
        print(f"bench: ladder_report.py not found in {[str(d) for d in dirs]}; run from a source checkout or pass "
              "--bench-dir", file=sys.stderr)  # fmt: skip
        return 2
    return subprocess.call([sys.executable, str(script), "run", "--out", args.out, "--suite", args.suite])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mbdl-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, devices, backends and the CUDA levels built here").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="shipped DEQ and DU models on shipped brain slices; table, PNG and JSON")
    demo.add_argument("--data", choices=["simulated", "real"], default="simulated",
                      help="simulated test slices (default) or the shipped real 16-coil scan at 4x and 6x")  # fmt: skip
    demo.add_argument("--num-images", type=_count, default=4, help="simulated test slices to reconstruct")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default="mbdl_fast_demo", help="output directory")
    demo.add_argument("--weights-dir", dest="weights_dir", default=None, help="models other than the shipped ones")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a model (config file and/or flags; torchrun for data-parallel)")
    train.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    defaults = TrainConfig()
    train.add_argument("--task", choices=["mri", "sr", "block-cs", "denoise"], help=f"(default: {defaults.task})")
    train.add_argument("--model", choices=["deq", "du", "varnet", "recursion", "edsr", "dncnn", "unet"],
                       help=f"(default: {defaults.model}; denoise trains a bare prior: edsr, dncnn, unet)")  # fmt: skip
    train.add_argument(
        "--prior", choices=["edsr", "dncnn", "unet"], help=f"prior of deq / du (default: {defaults.prior})"
    )
    train.add_argument("--model-args", dest="model_args", type=_json_object, help="JSON, e.g. '{\"f_max_iter\": 30}'")
    train.add_argument("--prior-args", dest="prior_args", type=_json_object, help="JSON, e.g. '{\"width\": 32}'")
    train.add_argument(
        "--init-prior", dest="init_prior", help="checkpoint (or shipped model name) of a pre-trained prior"
    )
    train.add_argument("--init-model", dest="init_model",
                       help="checkpoint (or shipped model name) of the same DEQ whose weights start the run")  # fmt: skip
    for name, kind in (("size", int), ("coils", int), ("acceleration", float), ("center_fraction", float),
                       ("noise_std", float), ("sr_factor", int), ("cs_ratio", float), ("denoise_sigma", float),
                       ("max_train_items", int), ("max_val_items", int), ("epochs", int), ("batch_size", int),
                       ("lr", float), ("grad_clip", float), ("seed", int), ("jac_reg", float),
                       ("slow_reg", float), ("slow_target", float)):  # fmt: skip
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                           help=f"(default: {getattr(defaults, name)})")  # fmt: skip
    train.add_argument("--mask-type", dest="mask_type", choices=["random", "equispaced", "uniform", "variable_density"],
                       help=f"(default: {defaults.mask_type})")  # fmt: skip
    train.add_argument("--sr-kernel", dest="sr_kernel", choices=SR_KERNELS,
                       help=f"(default: {defaults.sr_kernel})")  # fmt: skip
    train.add_argument("--loss", choices=["l1", "mse", "smooth_l1"], help=f"(default: {defaults.loss})")
    train.add_argument("--out", help=f"output directory for checkpoints and config.json (default: {defaults.out})")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    train.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last")
    train.add_argument("--keep-epochs", dest="keep_epochs", action="store_true", default=None,
                       help="also save every epoch's weights as OUT/model_epochN")  # fmt: skip
    train.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split (sharded under torchrun)")
    ev.add_argument("checkpoint", help="checkpoint path without suffix (e.g. runs/deq/model_best) or a shipped "
                    "model's name (e.g. deq_mri_4x)")  # fmt: skip
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--batch-size", dest="batch_size", type=_count, default=4)
    ev.add_argument("--tol", type=float, default=None, help="DEQ tolerance (default: the checkpoint's own)")
    ev.add_argument("--max-iter", dest="max_iter", type=int, default=None, help="DEQ iteration cap (default: the "
                    "checkpoint's own)")  # fmt: skip
    ev.add_argument("--out", default=None, help="write the setting, summary and per-image rows as JSON here")
    ev.add_argument("--compare", default=None, help="another model's --out JSON (e.g. the dense model's): print the "
                    "paired dPSNR / dSSIM with 95%% confidence intervals and the speed ratio")  # fmt: skip
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("prune", help="prune a checkpoint, fine-tune, report dense vs pruned at equal tolerance")
    pr.add_argument("--checkpoint", required=True, help="checkpoint path without suffix, or a shipped model name")
    pr.add_argument("--ratio", type=float, required=True, help="channel pruning ratio, e.g. 0.3")
    pr.add_argument("--importance", default="l1", choices=["l1", "l2", "taylor", "random"])
    pr.add_argument("--finetune", default=None, choices=["supervised", "school", "self_supervised"])
    pr.add_argument("--epochs", type=int, default=1)
    pr.add_argument("--lr", type=float, default=1e-4)
    pr.add_argument("--batch-size", dest="batch_size", type=_count, default=2)
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

    ad = sub.add_parser("adapt-real", help="test-time adaptation of a DEQ to the shipped real scan's undersampled "
                        "measurements (self-supervised, no reference); see mbdl_fast/adapt_real.py")  # fmt: skip
    ad.add_argument("--checkpoint", required=True, help="model path without suffix, e.g. mbdl_fast/weights/deq_mri_4x")
    ad.add_argument("--out", required=True, help="adapted model path without suffix")
    ad.add_argument("--setting", default="random4x", choices=["random4x", "uniform6x"], help="the demo's mask")
    ad.add_argument(
        "--strategy",
        default="split",
        choices=ADAPT_STRATEGIES,
        help="split: predict held-out k-space columns (SSDU); rei: SPADE's self-supervised (REI)",
    )
    ad.add_argument("--steps", type=int, default=ADAPT_STEPS, help=f"Adam steps (default {ADAPT_STEPS})")
    ad.add_argument("--lr", type=float, default=ADAPT_LR, help=f"learning rate (default {ADAPT_LR:g})")
    ad.add_argument(
        "--jac-reg",
        dest="jac_reg",
        type=float,
        default=ADAPT_JAC_REG,
        help=f"weight of the DEQ Jacobian penalty (default {ADAPT_JAC_REG:g})",
    )
    ad.add_argument(
        "--patience",
        type=int,
        default=ADAPT_PATIENCE,
        help=f"stop after this many steps without a lower validation error (default {ADAPT_PATIENCE})",
    )
    ad.add_argument("--seed", type=int, default=0)
    ad.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ad.add_argument("--quiet", action="store_true", help="no progress output")
    ad.set_defaults(func=_adapt_real)

    bn = sub.add_parser("bench", help="the benchmark ladder (DEQ/DU) and pruned-prior convs: Markdown, JSON, PNG")
    bn.add_argument("--out", default="bench/results/latest", help="output directory (default bench/results/latest)")
    bn.add_argument("--suite", default="all", choices=["ladder", "conv", "all"])
    bn.add_argument("--bench-dir", dest="bench_dir", default=None, help="the source checkout's bench/ directory")
    bn.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints one line (which flag, what was expected, what came) and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"mbdl-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        print(f"mbdl-fast {args.command}: error: {_one_line(err, _flags(parser, args.command))}", file=sys.stderr)
        return 2


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """dest -> its flag (``batch_size`` -> ``--batch-size``) for the subcommand's options."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help"}


def _one_line(err: BaseException, flags: dict[str, str]) -> str:
    """The error's message on one line, its leading ``name:`` replaced by the flag that set it."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        message = f"{err.filename}: {err.strerror}"
    match = re.match(r"(\w+): ", message)
    if match and match.group(1) in flags:
        message = f"{flags[match.group(1)]}: {message[match.end() :]}"
    hint = "" if isinstance(err, (ValueError, TypeError, FileNotFoundError)) else f" ({type(err).__name__})"
    return f"{message}{hint} (--debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
