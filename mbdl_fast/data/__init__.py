"""Data shipped with the package and simulators; nothing is downloaded at run time.

- ``load_brain_slices``: axial slices of the MNI ICBM152 2009a T1 template (notice in
  ``files/LICENSE_MNI_ICBM152.txt``).
- ``birdcage_coil_maps``, ``smooth_phase``, ``simulate_multicoil``, ``MultiCoilBrainDataset``:
  simulated multi-coil Cartesian acquisitions.
- ``load_natural_images``: CC0 / public-domain images from scikit-image, for super-resolution.
- ``FastMRISliceDataset``: slices of users' own fastMRI ``.h5`` files.
- ``load_real_brain``: real scanner k-space, an in-vivo 16-coil brain slice (3 T GRE, fully sampled; notice
  in ``files/LICENSE_pulseq_MR-Physics-with-Pulseq.txt``); ``root_sum_of_squares``.
"""

from mbdl_fast.data.brain import load_brain_slices
from mbdl_fast.data.fastmri import FastMRISliceDataset
from mbdl_fast.data.natural import NATURAL_IMAGES, load_natural_images
from mbdl_fast.data.real import load_real_brain, root_sum_of_squares
from mbdl_fast.data.simulate import MultiCoilBrainDataset, birdcage_coil_maps, simulate_multicoil, smooth_phase

__all__ = [
    "NATURAL_IMAGES",
    "FastMRISliceDataset",
    "MultiCoilBrainDataset",
    "birdcage_coil_maps",
    "load_brain_slices",
    "load_natural_images",
    "load_real_brain",
    "root_sum_of_squares",
    "simulate_multicoil",
    "smooth_phase",
]
