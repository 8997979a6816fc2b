"""Export: ``torch.export`` of a pruned prior and of a deep-unfolding forward with the fused DC-step custom op,
ONNX of a pruned prior; each exported program run and compared with the eager model on a fresh input."""

import warnings

import pytest
import torch
from conftest import rel_err

from mbdl_fast.backends import backends
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.priors import EDSR, DnCNN
from mbdl_fast.prune import prune_channels
from mbdl_fast.solvers import DeepUnfolding


def _pruned_prior() -> torch.nn.Module:
    torch.manual_seed(0)
    pruned = prune_channels(EDSR(width=32, num_blocks=3), 0.5).eval()
    assert pruned.widths[0] == 16  # physically smaller: 32 -> 16 channels
    return pruned


def _dynamic_image_shape() -> tuple[dict[int, object]]:
    dim = torch.export.Dim
    return ({0: dim("batch"), 2: dim("height", min=4), 3: dim("width", min=4)},)


def test_torch_export_of_a_pruned_prior():
    pruned = _pruned_prior()
    program = torch.export.export(pruned, (torch.randn(2, 2, 24, 20),), dynamic_shapes=_dynamic_image_shape())
    x = torch.randn(3, 2, 16, 28)  # another batch and size: the shapes are symbolic
    with torch.no_grad():
        assert rel_err(program.module()(x), pruned(x)) < 1e-6


class _Reconstruct(torch.nn.Module):
    """y -> model(y, physics): the operator (mask, coil maps) is part of the exported program."""

    def __init__(self, model: torch.nn.Module, physics: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.physics = model, physics

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.model(y, self.physics)


def test_torch_export_of_a_deep_unfolding_forward_keeps_the_fused_dc_step(device):
    fused = [name for name in ("cuda", "triton") if backends(device)[name].available]
    if not fused:
        pytest.skip(f"no fused DC-step backend here: {backends(device)['triton'].reason}")
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(1, 3, 16, 16, dtype=torch.complex64, generator=gen)
    maps = (maps / maps.abs().square().sum(1, keepdim=True).sqrt()).to(device)
    physics = MultiCoilMRI(random_mask(16, 3, 0.2, seed=0).to(device), maps)
    model = DeepUnfolding(DnCNN(depth=3, width=8), num_iters=2, dc_backend=fused[0]).to(device).eval()
    recon = _Reconstruct(model, physics)
    x = torch.randn(2, 16, 16, dtype=torch.complex64, generator=gen).to(device)
    program = torch.export.export(recon, (physics.A(x),))
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("mbdl_fast.mri_dc_step" in op for op in ops) == 2, ops  # one fused step per iteration, via its fake
    y = physics.A(torch.randn(2, 16, 16, dtype=torch.complex64, generator=gen).to(device))
    with torch.no_grad():
        assert rel_err(program.module()(y), recon(y)) < 1e-6


def test_onnx_export_of_a_pruned_prior():
    onnx = pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (the [export] extra) is not installed")
    from onnx.reference import ReferenceEvaluator

    pruned = _pruned_prior()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes
        program = torch.onnx.export(
            pruned, (torch.randn(2, 2, 24, 20),), dynamo=True, dynamic_shapes=_dynamic_image_shape(), verbose=False
        )
    model = program.model_proto
    onnx.checker.check_model(model)
    x = torch.randn(3, 2, 16, 28)
    out = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out), pruned(x)) < 1e-5
