"""Finetune, preprocess, plan, score or generate with Evo 2: `python launch.py task=... [overrides]`.

python launch.py                                                      # the demo (evo2_tiny, CPU)
python launch.py model=evo2_7b data.packing=padded ckpt.context=4096  # one finetune run
python launch.py -m model=evo2_7b ckpt.context=4096,8192 cluster=slurm
"""

import hydra
from omegaconf import DictConfig

from evo2_hydra.cli import run_launch
from evo2_hydra.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    return run_launch(cfg)


if __name__ == "__main__":
    main()
