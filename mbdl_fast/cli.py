"""The ``mbdl-fast`` command line.

- ``mbdl-fast info``: versions, devices, and which DC-step backends run here (with the reason when not).
- ``mbdl-fast demo``: on the shipped brain slices, simulate a multi-coil acquisition, reconstruct
  zero-filled and by CG-SENSE and by accelerated DC gradient steps, time the DC step per backend,
  print a table, write a PNG figure and a JSON of the numbers.
"""

from __future__ import annotations

import argparse
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
    from mbdl_fast.data import load_brain_slices, simulate_multicoil
    from mbdl_fast.demo import run_operator_demo

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = load_brain_slices("test", size=args.size)[: args.num_images]
    from mbdl_fast.physics.masks import random_mask

    mask = random_mask(images.shape[-1], args.acceleration, args.center_fraction, seed=args.seed)
    data = simulate_multicoil(images, num_coils=args.coils, mask=mask, noise_std=args.noise, seed=args.seed)
    result = run_operator_demo(data, device=device, iterations=args.iterations, out_dir=Path(args.out))
    print(result["table"])
    print(f"wrote {result['figure']} and {result['json']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbdl-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="reconstruct shipped brain slices; table, PNG and JSON")
    demo.add_argument("--num-images", type=int, default=4, help="test slices to reconstruct (default 4)")
    demo.add_argument("--size", type=int, default=None, help="resize slices to SIZE x SIZE (even)")
    demo.add_argument("--coils", type=int, default=8)
    demo.add_argument("--acceleration", type=int, default=4)
    demo.add_argument("--center-fraction", type=float, default=0.08)
    demo.add_argument("--noise", type=float, default=0.0, help="k-space noise std (per real/imag part)")
    demo.add_argument("--iterations", type=int, default=30, help="CG and gradient-step iterations")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default="mbdl_fast_demo", help="output directory (default ./mbdl_fast_demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
