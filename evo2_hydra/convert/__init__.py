"""convert.py targets: `run.py` resolves source/output and dispatches through `TARGETS`."""
