"""Fine-tuning (SPADE's three strategies) of any reconstruction model, pruned or not.

    from mbdl_fast.finetune import finetune
    result = finetune(pruned, train_set, "school", teacher=dense, epochs=5, lr=1e-4, val_dataset=val_set)
    result["history"][-1]["val_psnr"]

- ``finetune``: the one loop (``loop.py``); a strategy is a loss of (model, physics, y, target, teacher)
  (``strategies.py``): ``"supervised"``, ``"school"`` (frozen dense teacher, no ground truth),
  ``"self_supervised"`` (measurement consistency + rotation equivariance, REI; measurements only);
  ``SplitMeasurements`` (predict held-out k-space columns, SSDU / ZS-SSL; measurements only), passed as an object.
- ``rotate`` / ``rotate_physics``: exact quarter turns of images and of the operators that live in the
  image plane (coil maps), commuting with the centred FFT (``transforms.py``).
- ``configure_solver``: DEQ models are tuned at the dense model's solver tolerance unless a different
  one is asked for explicitly (``allow_different_tolerance=True``).
"""

from mbdl_fast.finetune.loop import (
    GUARDED_SOLVER_OPTIONS,
    BatchToProblem,
    Problem,
    configure_solver,
    evaluate,
    finetune,
    mri_problem,
    problem_from_config,
)
from mbdl_fast.finetune.strategies import (
    IMAGE_LOSSES,
    STRATEGIES,
    School,
    SelfSupervised,
    SplitMeasurements,
    Strategy,
    Supervised,
    WarmStarts,
    acs_band,
    image_loss,
    make_strategy,
    relative_squared_error,
)
from mbdl_fast.transforms import rotate, rotate_physics

__all__ = [
    "GUARDED_SOLVER_OPTIONS",
    "IMAGE_LOSSES",
    "STRATEGIES",
    "BatchToProblem",
    "Problem",
    "School",
    "SelfSupervised",
    "SplitMeasurements",
    "Strategy",
    "Supervised",
    "WarmStarts",
    "acs_band",
    "configure_solver",
    "evaluate",
    "finetune",
    "image_loss",
    "make_strategy",
    "mri_problem",
    "problem_from_config",
    "relative_squared_error",
    "rotate",
    "rotate_physics",
]
