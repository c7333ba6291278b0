"""Slurm glue: the submitit launcher subclass (`launcher.py`) and the pre-submit site checks (`site.py`).

`cluster=slurm` selects `hydra/launcher: evo2_slurm`, which is hydra-submitit-launcher's Slurm
launcher plus: one resource shape per multirun, every sweep point validated and the site checked
with sinfo before anything is submitted, a dry run, job ids / log paths printed at submission, failed
tasks reported with their log tail, and requeue-safe task exits.
"""
