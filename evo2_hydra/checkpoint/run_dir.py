"""The one reader for what a run saved: its config, conditioning mapping and where it came from.

A finetune run keeps its resolved config twice: `RUN/config.yaml` (what the folder belongs to)
and `RUN/checkpoints/global_stepN/configs/config.yaml` (what that step was trained with), plus the
conditioning mapping in `global_stepN/conditions.json`. Everything that reads these files
(score, generate, convert, resume) goes through this module, so they are all parsed the same
guarded way:

- at most `MAX_SAVED_BYTES` are read (a saved config is a few KB);
- YAML aliases are refused (`*name`: a 3 KB "billion laughs" file expands to gigabytes in any
  loader that follows them; OmegaConf never writes aliases, so a saved config has none);
- any problem is one `UserError` line naming the file.

    saved = read_saved_run(locate_checkpoint(path))   # None for a checkpoint that is not ours
    saved.model(), saved.context, saved.append_eod, saved.conditions()
    config = read_config_file(run_dir / "config.yaml") # the parsed dict, same guards
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evo2_hydra.errors import UserError

if TYPE_CHECKING:
    from evo2_hydra.checkpoint.layout import CheckpointLocation
    from evo2_hydra.config import ModelConfig

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # in the run folder
STEP_CONFIG = Path("configs") / "config.yaml"  # in each step folder (where savanna keeps its YAMLs)
CONDITIONS_FILE = "conditions.json"  # in each step folder
MAX_SAVED_BYTES = 1 << 20  # 1 MiB: a saved run config is a few KB


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (and so merge keys `<<: *x` built from them)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} (aliases are not allowed)", event.start_mark
            )
        return super().compose_node(parent, index)


def read_bounded(path: Path, limit: int = MAX_SAVED_BYTES) -> str:
    """The text of a small saved file, refusing anything that is not a regular file under `limit`."""
    try:
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > limit:
        raise UserError(f"{path}: larger than {limit} bytes; not a saved run file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None


def parse_config_yaml(text: str, where: str | Path) -> dict[str, Any]:
    """A saved config's YAML text as a dict; refuses aliases and anything but a mapping."""
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not a valid saved config{at}: {problem}") from None
    except RecursionError:
        raise UserError(f"{where}: not a valid saved config: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping of config sections, found {type(data).__name__}"
        )
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a saved `config.yaml` (run folder or step folder) with the guards above."""
    path = Path(path)
    return parse_config_yaml(read_bounded(path), path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def model_from_section(section: Any, where: str | Path) -> ModelConfig:
    """A saved `model:` section as a validated ModelConfig (one line naming the file if not)."""
    from omegaconf import OmegaConf

    from evo2_hydra.config import ModelConfig

    if not isinstance(section, dict):
        raise UserError(f"{where}: the saved `model` section is missing or not a mapping")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - any schema problem means a bad file
        key = getattr(err, "full_key", None)
        at = f"model.{key}: " if key else ""
        raise UserError(
            f"{where}: the saved `model` section does not fit the schema: {at}{_first_line(err)}"
        ) from None


def read_conditions(path: Path) -> dict[str, str]:
    """A step's `conditions.json`: class name -> single-byte token."""
    try:
        mapping = json.loads(read_bounded(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UserError(f"{path}: expected an object of class name -> token string")
    return {str(k): v for k, v in mapping.items()}


@dataclass
class SavedRun:
    """What one of our runs saved next to a checkpoint, parsed once."""

    config: dict[str, Any]  # the whole saved config (plain data)
    config_path: Path  # the file it came from
    step_dir: Path | None  # the step folder the weights come from (None: a run-level config)

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{self.config_path}: the saved `{name}` section is not a mapping")
        return value

    def has_model(self) -> bool:
        return isinstance(self.config.get("model"), dict)

    def model(self) -> ModelConfig:
        return model_from_section(self.config.get("model"), self.config_path)

    def _typed(self, section: str, key: str, kind: type) -> Any:
        value = self.section(section).get(key)
        if value is None:
            return None
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(
                f"{self.config_path}: {section}.{key}={value!r}, expected a positive integer"
            )
        if kind is bool and not isinstance(value, bool):
            raise UserError(f"{self.config_path}: {section}.{key}={value!r}, expected true/false")
        return value

    @property
    def context(self) -> int | None:
        """`ckpt.context` the run trained at."""
        return self._typed("ckpt", "context", int)

    @property
    def append_eod(self) -> bool | None:
        """Whether the run's training documents ended with EOD."""
        return self._typed("data", "append_eod", bool)

    def conditions(self) -> dict[str, str]:
        """The conditioning mapping: the step's `conditions.json`, else the saved data config."""
        if self.step_dir is not None and (self.step_dir / CONDITIONS_FILE).is_file():
            return read_conditions(self.step_dir / CONDITIONS_FILE)
        cond = self.section("data").get("condition") or {}
        enabled = isinstance(cond, dict) and any(
            cond.get(k)
            for k in ("field", "header_regex", "tsv")  # JSONL field or FASTA sources
        )
        if not enabled:
            return {}
        tokens = cond.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise UserError(f"{self.config_path}: data.condition.tokens is not a mapping")
        return {str(k): str(v) for k, v in tokens.items()}


def saved_config_candidates(location: CheckpointLocation) -> list[Path]:
    """Where a run config may lie for this checkpoint, most specific first."""
    candidates: list[Path] = []
    if location.step_dir is not None:
        candidates.append(location.step_dir / STEP_CONFIG)
        candidates.append(location.step_dir.parent.parent / RUN_CONFIG)  # RUN/checkpoints/step
    if location.source.is_dir():
        candidates.append(location.source / RUN_CONFIG)
    return candidates


def read_saved_run(location: CheckpointLocation) -> SavedRun | None:
    """The saved run config that belongs to a located checkpoint, or None (not one of ours).

    Raises:
        UserError: a saved config exists but is unreadable, too large, not YAML, or uses aliases.
    """
    for path in saved_config_candidates(location):
        if path.exists():
            config = read_config_file(path)
            if isinstance(config.get("model"), dict):
                return SavedRun(config, path, location.step_dir)
    return None
