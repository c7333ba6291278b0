"""Export or re-save checkpoints: `python convert.py target=vortex|nemo|savanna source=PATH output=DIR`."""

import hydra
from omegaconf import DictConfig

from evo2_hydra.cli import run_convert
from evo2_hydra.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig):
    return run_convert(cfg)


if __name__ == "__main__":
    main()
