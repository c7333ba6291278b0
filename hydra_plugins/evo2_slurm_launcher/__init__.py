"""Hydra only instantiates launchers defined under the `hydra_plugins` namespace; the logic lives in
evo2_hydra/cluster/launcher.py, this subclass only gives it a name Hydra accepts.
"""

from evo2_hydra.cluster.launcher import Evo2SlurmLauncherBase


class Evo2SlurmLauncher(Evo2SlurmLauncherBase):
    """`hydra/launcher: evo2_slurm` (see evo2_hydra.cluster.launcher)."""
