"""Continue fine-tuning a pruned DEQ checkpoint (supervised, Jacobian-regularised) at the dense model's tolerance.

    python scripts/finetune_pruned.py SRC OUT EPOCHS LR [DENSE]

SRC: a pruned checkpoint (``mbdl-fast prune --out``'s ``model_pruned``); OUT: where the continued model is saved;
DENSE (default the shipped ``deq_mri_4x``): the dense model whose training set-up and tolerance apply. Step 6 of
``scripts/train_shipped.sh`` runs it after ``mbdl-fast prune`` (a second cosine cycle at a lower learning rate).
"""

import sys
import warnings

import torch

from mbdl_fast.checkpoint import load_model, read_metadata, save_model
from mbdl_fast.prune.pipeline import finetune_pruned, load_problem
from mbdl_fast.weights import weights_path


def main() -> None:
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__.split("\n\n")[1].strip())
    src, out, epochs, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    dense = sys.argv[5] if len(sys.argv) == 6 else str(weights_path("deq_mri_4x"))
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    problem = load_problem(dense, num_test=2)
    model = load_model(src)
    history = finetune_pruned(problem, model, "supervised", epochs, lr, jac_reg=0.05, progress=False)
    for record in history:
        print(f"epoch {record['epoch'] + 1}/{epochs}: val PSNR {record['val_psnr']:.2f} dB", flush=True)
    meta = read_metadata(src)
    meta.setdefault("pruning", {})["continued"] = {
        "strategy": "supervised",
        "epochs": epochs,
        "lr": lr,
        "jac_reg": 0.05,
    }
    save_model(model, out, metadata=meta)


if __name__ == "__main__":
    main()
