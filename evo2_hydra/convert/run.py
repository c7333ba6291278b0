"""`python convert.py target=vortex|nemo|savanna source=PATH output=DIR`: resolve, refuse, dispatch.

The source is anything `ckpt.path` accepts (see evo2_hydra/checkpoint/layout.py); without
`source`, the newest run under `paths.output_root` (the one whose checkpoint `latest` changed last).
An existing output is refused unless `overwrite=true`, and then only replaced if it is an
earlier conversion (`check_output`). Each target is a function
`(conv, source, output) -> Path` registered in `TARGETS` ("module:function", imported lazily).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from evo2_hydra.checkpoint import bulk_io
from evo2_hydra.checkpoint.hub import local_checkpoint_path
from evo2_hydra.checkpoint.layout import newest_run
from evo2_hydra.checkpoint.manifest import MANIFEST, is_export
from evo2_hydra.checkpoint.mapped import tracking_mapped_files
from evo2_hydra.config import ConvertConfig, TargetKind
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import LOCK_NAME, exclusive_lock, remove_stale_temporaries

log = logging.getLogger("evo2_hydra.convert")

TARGETS: dict[TargetKind, str] = {
    TargetKind.savanna: "evo2_hydra.convert.targets:convert_savanna",
    TargetKind.vortex: "evo2_hydra.convert.targets:convert_vortex",
    TargetKind.nemo: "evo2_hydra.convert.targets:convert_nemo",
}


def resolve_source(conv: ConvertConfig) -> Path:
    """The checkpoint to convert: `source`, or the newest run under paths.output_root."""
    if conv.source is not None:
        return local_checkpoint_path(conv.source)  # a Hub id -> its cached file (hub.py)
    run = newest_run(Path(conv.paths.output_root))
    log.info("source not given: using the newest run %s", run)
    return run


def _target(kind: TargetKind):
    if kind not in TARGETS:
        have = ", ".join(k.value for k in TARGETS)
        raise UserError(f"target={kind.value} is not available in this build (available: {have})")
    module, func = TARGETS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def default_output(conv: ConvertConfig, source: Path) -> Path:
    """`paths.output_root/exports/<source name>-<target>`: e.g. exports/evo2_tiny-ctx512-vortex."""
    name = source.name.removesuffix(".pt")
    if source.name.startswith("global_step"):  # name the run, not only the step
        name = f"{source.resolve().parent.parent.name}-{source.name}"
    target = conv.target.kind.value
    if conv.target.kind == TargetKind.nemo:
        target = f"nemo-{conv.target.format.value}"
    return Path(conv.paths.output_root) / "exports" / f"{name}-{target}"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_output(output: Path, source: Path, *, overwrite: bool) -> None:
    """Refuse an output that would touch the source, or replace a folder we did not write.

    Symlinks are resolved first. `overwrite=true` replaces only a folder this project wrote (it
    carries our `manifest.json`): never the source, a folder holding it, or an arbitrary folder.
    """
    out, src = output.resolve(), source.resolve()
    if out == src:
        raise UserError(f"output={output} is the source; the source is never modified")
    if out in src.parents:
        raise UserError(
            f"output={output} contains source={source}; choose an output outside the source"
        )
    if src in out.parents:
        raise UserError(f"output={output} is inside source={source}; the source is never modified")
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise UserError(f"output={output} already exists; set overwrite=true to replace it")
    if not output.is_dir() or output.is_symlink() or not is_export(output):
        raise UserError(
            f"output={output} exists and is not a folder convert.py wrote (no {MANIFEST}); "
            "overwrite=true replaces only earlier conversions: choose another output"
        )


def run_convert(conv: ConvertConfig) -> Path:
    """Entry of convert.py (after validation): check source and output, run the target."""
    convert = _target(conv.target.kind)
    source = resolve_source(conv)
    if conv.output is None:
        output = default_output(conv, source)
        log.info("output not given: writing %s", output)
    else:
        output = Path(conv.output).expanduser()
    # One conversion per output at a time: a second one fails now, not after converting
    # everything; the existence check runs under the lock (a finished winner is seen).
    lock = output.parent / f".{output.name}{LOCK_NAME}"
    with exclusive_lock(lock, f"output={output}"):
        check_output(output, source, overwrite=conv.overwrite)
        remove_stale_temporaries(output.parent, output.name)  # of a conversion that was killed
        return _convert_locked(conv, convert, source, output)


def _convert_locked(conv: ConvertConfig, convert, source: Path, output: Path) -> Path:
    # Sources loaded in this block are registered with their file offsets, so tensors that a
    # target writes unchanged are copied file to file (checkpoint/bulk_io.py).
    with tracking_mapped_files():
        started, before = time.perf_counter(), bulk_io.totals()
        result = convert(conv, source, output)
        seconds, after = time.perf_counter() - started, bulk_io.totals()
    log.info(
        "wrote %s: converted in %.2f s (%s of tensor data, %s of it copied file to file)",
        result,
        seconds,
        _size(after[0] - before[0]),
        _size(after[1] - before[1]),
    )
    return result
