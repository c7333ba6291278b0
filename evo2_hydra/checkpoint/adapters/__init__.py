"""Pure state-dict adapters: savanna keys and tensors <-> another format's, no file I/O.

`vortex`: the single-file inference layout (export and import). `nemo`: NeMo2 / Megatron keys and
the `context/` metadata. The files themselves are written by `checkpoint/stream.py` (torch.save
format) and `checkpoint/nemo_io.py` (DCP / zarr).
"""

# Top-level marker on model-state dicts converted on load from another format (vortex, NeMo2,
# Megatron-Bridge): they carry no manifest of their savanna form, and preparation records where they
# came from.
IMPORTED_FROM = "evo2_hydra_imported_from"
