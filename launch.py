"""Finetune, preprocess, plan, score or generate with Evo 2: `python launch.py task=... [overrides]`.

python launch.py                                                      # the demo (evo2_tiny, CPU)
python launch.py model=evo2_7b data.packing=padded ckpt.context=4096  # one finetune run
python launch.py -m model=evo2_7b ckpt.context=4096,8192 cluster=slurm
python launch.py --help                                               # tasks, groups, fields
"""

from evo2_hydra.cli import entry_point, run_launch

if __name__ == "__main__":
    entry_point("train", run_launch)
