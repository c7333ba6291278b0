"""What both entry points do after Hydra composed the config: validate once, then dispatch.

Validation errors, `UserError`s and file-system errors (an `OSError` naming its path: permission
denied, a full disk, a parent that is a file) become one line on stderr and exit code 2; this is
the one place that translates them. Ctrl-C becomes one line and exit code 130. A run folder that
Hydra created for a run that never started is removed again.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evo2_hydra.config import ConfigError, ConvertConfig, RunConfig, Task
from evo2_hydra.errors import UserError

log = logging.getLogger("evo2_hydra")

# task -> "module:function"; imported lazily so `task=plan` never imports DeepSpeed.
TASKS: dict[Task, str] = {
    Task.finetune: "evo2_hydra.train.run:run_finetune",
    Task.preprocess: "evo2_hydra.data.preprocess:run_preprocess",
    Task.plan: "evo2_hydra.plan:run_plan",
    Task.score: "evo2_hydra.score:run_score",
    Task.generate: "evo2_hydra.generate:run_generate",
    Task.embed: "evo2_hydra.infer.embed:run_embed",
    Task.vep: "evo2_hydra.infer.vep:run_vep",
}
CONVERT = "evo2_hydra.convert.run:run_convert"


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not running under Hydra (e.g. a direct call from a test)
        return None


def _remove_run_dir_if_empty() -> None:
    """Hydra makes the run folder before the task starts; drop it when nothing was written to it
    (a run that failed validation, or a task such as plan that writes elsewhere)."""
    out = _hydra_output_dir()
    if out is not None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _fail(message: str) -> None:
    """Print one line, remove the run folder if nothing was written to it, exit 2."""
    _remove_run_dir_if_empty()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def describe_os_error(err: OSError) -> str:
    """`<path>: <cause>` for a file-system error (the path of the file or folder it names)."""
    cause = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return cause
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {cause}"
    return f"{err.filename}: {cause}"


def _interrupted() -> None:
    _remove_run_dir_if_empty()
    print("error: interrupted (Ctrl-C): stopped without saving", file=sys.stderr)
    sys.exit(130)


def to_run_config(cfg: DictConfig, schema: type) -> Any:
    """Convert the composed config to dataclasses once, so `__post_init__` rules run."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, UserError) as err:
        _fail(str(err))
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        _fail(str(cause) if cause else str(err).splitlines()[0])
    if not isinstance(obj, schema):
        _fail(f"the composed config is a {type(obj).__name__}, expected {schema.__name__}")
    return obj


def run_launch(cfg: DictConfig) -> Any:
    if cfg.get("resume"):  # resume=RUN_DIR: the run's saved config, few overrides allowed
        from evo2_hydra.train.run import resumed_config

        try:
            cfg = resumed_config(cfg)
        except (UserError, ConfigError) as err:
            _fail(str(err))
    run: RunConfig = to_run_config(cfg, RunConfig)
    try:
        if run.task not in (Task.plan, Task.preprocess):
            from evo2_hydra.checkpoint.hub import pin_config_paths

            pin_config_paths(run)  # hf:// ids -> their commit, so the saved config pins it
        result = _resolve(TASKS[run.task])(run)
    except (UserError, ConfigError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(describe_os_error(err))
    except KeyboardInterrupt:
        _interrupted()
    finally:
        _remove_run_dir_if_empty()
    if isinstance(result, dict) and result.get("stopped_by") == "SIGINT":
        sys.exit(130)  # stopped by Ctrl-C after saving (the summary said so): not a success
    return result


def run_convert(cfg: DictConfig) -> Any:
    conv: ConvertConfig = to_run_config(cfg, ConvertConfig)
    try:
        from evo2_hydra.checkpoint.hub import pin_config_paths

        pin_config_paths(conv)  # hf:// ids -> their commit (hub.py)
        return _resolve(CONVERT)(conv)
    except (UserError, ConfigError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(describe_os_error(err))
    except KeyboardInterrupt:
        _interrupted()
    finally:
        _remove_run_dir_if_empty()
