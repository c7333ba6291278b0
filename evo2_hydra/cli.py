"""The command-line layer: Hydra registration, composition errors, validation, dispatch.

Both entry points (``launch.py``, ``convert.py``) call ``entry_point``; it registers the schemas in
Hydra's ConfigStore (so the rest of the package never imports Hydra) and runs ``hydra.main``.
Hydra's composition errors, validation errors, `UserError`s and file-system errors (an `OSError`
naming its path: permission denied, a full disk, a parent that is a file) become one line on
stderr and exit code 2; this is the one place that translates them. Ctrl-C becomes one line and
exit code 130. A run folder that Hydra created for a run that never started is removed again.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evo2_hydra.config import (
    REPO_ROOT,
    CkptConfig,
    ClusterConfig,
    ConfigError,
    ConvertConfig,
    DataConfig,
    ModelConfig,
    NemoTargetConfig,
    PeftConfig,
    RunConfig,
    SavannaTargetConfig,
    Task,
    VortexTargetConfig,
    check_known_keys,
)
from evo2_hydra.errors import UserError, interrupted_message

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


# ----------------------------------------------------------------------------------------------
# Registration


def _output_dir() -> str:
    """``${evo2_output_dir:}``: the run folder Hydra made, or the one it would make.

    Under ``--cfg job --resolve`` Hydra has not set ``hydra.runtime.output_dir`` yet (which made
    ``${hydra:runtime.output_dir}`` fail); then the configured ``hydra.run.dir`` is the folder a
    run would use.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "."
    hydra_cfg = HydraConfig.get()
    runtime = hydra_cfg.runtime
    if not OmegaConf.is_missing(runtime, "output_dir") and runtime.output_dir is not None:
        return str(runtime.output_dir)
    return str(hydra_cfg.run.dir)


def register_configs() -> None:
    """Store the schemas so YAML files can extend them (`defaults: [base_run, _self_, ...]`).

    Also registers the resolvers ``${evo2_repo:}`` (the repository root, so shipped examples
    resolve from any cwd) and ``${evo2_output_dir:}`` (the run folder), and the Slurm launcher.
    """
    from hydra.core.config_store import ConfigStore

    from evo2_hydra.cluster.launcher import register_launcher  # hydra/launcher: evo2_slurm

    if not OmegaConf.has_resolver("evo2_repo"):
        OmegaConf.register_new_resolver("evo2_repo", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("evo2_run_name"):
        from evo2_hydra.run_identity import run_name_resolver

        OmegaConf.register_new_resolver("evo2_run_name", run_name_resolver)
    if not OmegaConf.has_resolver("evo2_output_dir"):
        OmegaConf.register_new_resolver("evo2_output_dir", _output_dir)
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(name="base_convert", node=ConvertConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="ckpt", name="base_ckpt", node=CkptConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="peft", name="base_peft", node=PeftConfig)
    cs.store(group="target", name="base_vortex", node=VortexTargetConfig)
    cs.store(group="target", name="base_nemo", node=NemoTargetConfig)
    cs.store(group="target", name="base_savanna", node=SavannaTargetConfig)
    register_launcher()


# ----------------------------------------------------------------------------------------------
# Errors


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
    """Drop the run folder Hydra made when nothing was written to it.

    (A run that failed validation, or a task such as plan that writes elsewhere.)
    """
    out = _hydra_output_dir()
    if out is not None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _fail(message: str) -> None:
    """Print one line, remove the run folder if nothing was written to it, exit 2."""
    _remove_run_dir_if_empty()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Lines of Hydra/OmegaConf messages that add nothing on one line, or mislead: Hydra suggests
# `+key=value` for a misspelled key, which would only add the misspelling.
_NOISE = ("To append to your config", "full_key:", "reference_type", "object_type", "Set the env")


def one_line(err: BaseException) -> str:
    """A Hydra or OmegaConf error message as one line (its informative lines joined)."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, (ConfigError, UserError)):
            return str(cause)
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    cause = err.__cause__
    if cause is not None and str(cause).splitlines():
        first = str(cause).splitlines()[0].strip()
        if first and first not in kept:
            kept.append(first)
    return "; ".join(kept) or type(err).__name__


def describe_os_error(err: OSError) -> str:
    """`<path>: <cause>` for a file-system error (the path of the file or folder it names)."""
    cause = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return cause
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {cause}"
    return f"{err.filename}: {cause}"


def _interrupted(err: KeyboardInterrupt) -> None:
    _remove_run_dir_if_empty()
    print(f"error: {interrupted_message(err)}", file=sys.stderr)
    sys.exit(130)


def to_run_config(cfg: DictConfig, schema: type) -> Any:
    """Convert the composed config to dataclasses once, so `__post_init__` rules run."""
    try:
        check_known_keys(cfg)
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, UserError) as err:
        _fail(str(err))
    except OmegaConfBaseException as err:
        _fail(one_line(err))
    if not isinstance(obj, schema):
        _fail(f"the composed config is a {type(obj).__name__}, expected {schema.__name__}")
    return obj


# ----------------------------------------------------------------------------------------------
# Tasks


def run_launch(cfg: DictConfig) -> Any:
    """launch.py: validate, then run the task (or, with dry_run=true, print the plan)."""
    if cfg.get("resume"):  # resume=RUN_DIR: the run's saved config, few overrides allowed
        from evo2_hydra.train.run import resumed_config

        try:
            cfg = resumed_config(cfg)
        except (UserError, ConfigError) as err:
            _fail(str(err))
    run: RunConfig = to_run_config(cfg, RunConfig)
    try:
        if run.dry_run:
            from evo2_hydra.dry_run import print_dry_run

            return print_dry_run(run)
        if run.task not in (Task.plan, Task.preprocess):
            from evo2_hydra.checkpoint.hub import pin_config_paths

            pin_config_paths(run)  # hf:// ids -> their commit, so the saved config pins it
        result = _resolve(TASKS[run.task])(run)
    except (UserError, ConfigError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(describe_os_error(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    finally:
        _remove_run_dir_if_empty()
    if isinstance(result, dict) and result.get("stopped_by") == "SIGINT":
        sys.exit(130)  # stopped by Ctrl-C after saving (the summary said so): not a success
    return result


def run_convert(cfg: DictConfig) -> Any:
    """convert.py: validate, then convert."""
    conv: ConvertConfig = to_run_config(cfg, ConvertConfig)
    try:
        from evo2_hydra.checkpoint.hub import pin_config_paths

        pin_config_paths(conv)  # hf:// ids -> their commit (hub.py)
        return _resolve(CONVERT)(conv)
    except (UserError, ConfigError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(describe_os_error(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    finally:
        _remove_run_dir_if_empty()


def entry_point(config_name: str, run: Callable[[DictConfig], Any]) -> None:
    """Run `hydra.main` for `conf/<config_name>.yaml`; composition errors are one line, exit 2."""
    import hydra
    from hydra.errors import HydraException

    register_configs()
    started = False

    @hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        return run(cfg)

    # Hydra prints its own multi-line report and exits 1 unless HYDRA_FULL_ERROR is set, in
    # which case it raises: we catch what it raises before the task started.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except (HydraException, OmegaConfBaseException, ValueError, UserError) as err:
        # Before the task started, these are usage errors (composition, overrides, flags such as
        # `--cfg job -m`); once it runs, only ours are, and anything else is a bug to see whole.
        if started and not isinstance(err, (ConfigError, UserError)):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
