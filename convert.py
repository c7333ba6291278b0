"""Export or re-save checkpoints: `python convert.py target=vortex|nemo|savanna source=PATH output=DIR`.

python convert.py --help      # targets and their options
"""

from evo2_hydra.cli import entry_point, run_convert

if __name__ == "__main__":
    entry_point("convert", run_convert)
