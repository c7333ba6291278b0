"""Pure state-dict adapters: savanna keys and tensors <-> another format's, no file I/O.

`vortex`: the single-file inference layout (export and import). `nemo`: NeMo2 / Megatron keys and
the `context/` metadata. The files themselves are written by `checkpoint/stream.py` (torch.save
format) and `checkpoint/nemo_io.py` (DCP / zarr).
"""
