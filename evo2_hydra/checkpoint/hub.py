"""`hf://ORG/REPO[@REVISION][/FILE]` as a checkpoint path, resolved with huggingface_hub.

Wherever a checkpoint path is read (`ckpt.path`, convert.py's `source`, ...), `layout.py` first
calls `local_checkpoint_path`, which turns a Hub id into the file in huggingface_hub's cache
(downloaded there, with its progress bars, when missing; `HF_HOME`, `HF_HUB_CACHE` and
`HF_HUB_OFFLINE` are honoured as huggingface_hub reads them):

- with FILE: that file, or its parts `FILE.part0..N` when the repo holds the file in parts;
- without FILE: the repo's one checkpoint, a single `*.pt` or one set of `*.pt.partN` parts
  (`arcinstitute/savanna_evo2_40b` holds `savanna_evo2_40b.pt.part0..4` on its Hub page).

Parts are never joined on disk: `parts.py` reads them as one file. Every resolution is pinned to
the commit the revision named (`hf://ORG/REPO@<commit>/FILE`, `Resolved.pinned`): the CLI writes
that id into the run's saved config (`pin_config_paths`), and export manifests list what was
resolved (`resolved_sources`). On-disk sizes are checked against the Hub's recorded sizes (the
cached tree listing, or one metadata call when online).

Failures are one line: the id, what is wrong, and when the cache lacks it offline, the
`hf download ...` command that fetches it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

SCHEME = "hf:/"  # matches hf://...; Path() collapses the double slash to hf:/..., also accepted
CHECKPOINT_PATTERNS = ["*.pt", "*.pt.part*"]
PART_SUFFIX_RE = re.compile(r"\.part\d+$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubId:
    """A parsed `hf://ORG/REPO[@REVISION][/FILE]` checkpoint id."""

    repo: str  # ORG/REPO
    revision: str | None  # branch, tag or commit; None = main
    filename: str | None  # path in the repo; None = the repo's one checkpoint

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}{rev}{'/' + self.filename if self.filename else ''}"

    def download_command(self) -> str:
        # The file, or its parts when the repo holds it in parts (one --include per pattern).
        name = self.filename or "*.pt"
        files = f" --include '{name}' --include '{name}.part*'"
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo}{files}{rev}"


@dataclass(frozen=True)
class Resolved:
    """A Hub id pinned to the commit its revision resolved to, and the file it names."""

    id: HubId  # as given
    commit: str  # the commit the revision resolved to
    filename: str  # the checkpoint's name in the repo (NAME.pt for a part set)
    local: Path  # the cached file, or part0 of a part set
    files: tuple[str, ...]  # repo paths read (the file, or every part)

    @property
    def pinned(self) -> str:
        return str(HubId(self.id.repo, self.commit, self.filename))


_resolved: dict[str, Resolved] = {}  # id string (as given, and pinned) -> resolution


def is_hub_id(path: Any) -> bool:
    """Whether a path is a Hub id (`hf://...`)."""
    return isinstance(path, (str, Path)) and str(path).startswith(SCHEME)


def parse_hub_id(text: str | Path) -> HubId | None:
    """The parts of `hf://ORG/REPO[@REVISION][/FILE]`; None for anything else."""
    if not is_hub_id(text):
        return None
    rest = str(text)[len(SCHEME) :].lstrip("/")
    segments = rest.split("/")
    usage = "expected hf://ORG/REPO[@REVISION][/FILE]"
    if len(segments) < 2 or not segments[0] or not segments[1]:
        raise UserError(f"{text}: not a Hub id ({usage})")
    name, _, revision = segments[1].partition("@")
    if "@" in segments[1] and not revision:
        raise UserError(f"{text}: empty revision after '@' ({usage})")
    filename = "/".join(segments[2:]).strip("/") or None
    return HubId(f"{segments[0]}/{name}", revision or None, filename)


def local_checkpoint_path(path: str | Path) -> Path:
    """`path` as a local path: a Hub id resolved to its cached file, anything else unchanged."""
    if not is_hub_id(path):
        return Path(path).expanduser()
    return resolve(path).local


def pin(path: str | None) -> str | None:
    """A Hub id pinned to its resolved commit (resolving it); other paths unchanged."""
    return resolve(path).pinned if path is not None and is_hub_id(path) else path


def pin_config_paths(cfg: Any) -> None:
    """Resolve the Hub ids of a run/convert config in place, so its saved copy names the commit."""
    ckpt = getattr(cfg, "ckpt", None)
    if ckpt is not None and is_hub_id(ckpt.path):
        ckpt.path = pin(ckpt.path)
    if is_hub_id(getattr(cfg, "source", None)):
        cfg.source = pin(cfg.source)


def resolved_sources() -> list[dict[str, Any]]:
    """What this process resolved from the Hub (for export manifests)."""
    seen = {id(r): r for r in _resolved.values()}.values()
    return [
        {"id": str(r.id), "pinned": r.pinned, "commit": r.commit, "files": list(r.files)}
        for r in seen
    ]


def resolve(text: str | Path) -> Resolved:
    """Find (downloading if needed) the checkpoint a Hub id names; memoized per process."""
    hub_id = parse_hub_id(text)
    assert hub_id is not None
    if str(hub_id) in _resolved:
        return _resolved[str(hub_id)]
    from huggingface_hub import errors

    try:
        local = _fetch_file(hub_id) if hub_id.filename else _fetch_repo(hub_id)
    except errors.RepositoryNotFoundError as err:
        raise UserError(
            f"{hub_id}: no repository {hub_id.repo} on the Hub (or it is private or gated: "
            "log in with `hf auth login`)"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise UserError(
            f"{hub_id}: revision {hub_id.revision} does not exist in {hub_id.repo}"
        ) from err
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError) as err:
        raise UserError(_offline_message(hub_id)) from err
    except errors.EntryNotFoundError as err:
        raise UserError(
            f"{hub_id}: {hub_id.filename} (or {hub_id.filename}.part0..N) is not in {hub_id.repo}"
            f" at revision {hub_id.revision or 'main'}"
        ) from err
    except errors.HfHubHTTPError as err:
        raise UserError(f"{hub_id}: the Hub answered {str(err).splitlines()[0]}") from err
    snapshot, commit = _snapshot_of(local)
    filename = PART_SUFFIX_RE.sub("", local.relative_to(snapshot).as_posix())
    files = _files_of(local, snapshot)
    _check_sizes(hub_id, commit, snapshot, files)
    result = Resolved(hub_id, commit, filename, local, files)
    log.info("%s: %s at commit %s (%s)", hub_id, filename, commit, local.parent)
    _resolved[str(hub_id)] = _resolved[result.pinned] = result
    return result


def _fetch_file(hub_id: HubId) -> Path:
    from huggingface_hub import errors, hf_hub_download, snapshot_download

    assert hub_id.filename is not None
    try:
        return Path(hf_hub_download(hub_id.repo, hub_id.filename, revision=hub_id.revision))
    except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError):
        # Published in parts? (EntryNotFound online; offline the parts may be cached)
        folder = snapshot_download(
            hub_id.repo, revision=hub_id.revision, allow_patterns=[f"{hub_id.filename}.part*"]
        )
        part0 = Path(folder) / f"{hub_id.filename}.part0"
        if part0.is_file():
            return part0
        raise


def _fetch_repo(hub_id: HubId) -> Path:
    from huggingface_hub import snapshot_download

    folder = Path(
        snapshot_download(hub_id.repo, revision=hub_id.revision, allow_patterns=CHECKPOINT_PATTERNS)
    )
    from evo2_hydra.checkpoint.parts import part_sets_in

    found = sorted(folder.glob("*.pt")) + part_sets_in(folder)
    if len(found) != 1:
        names = ", ".join(f.name for f in found) or "no *.pt or *.pt.partN file"
        raise UserError(
            f"{hub_id}: expected one checkpoint in {hub_id.repo} (a .pt file or one set of "
            f".pt.partN parts), found {names}; name it: {hub_id}/FILE"
        )
    return found[0]


def _snapshot_of(local: Path) -> tuple[Path, str]:
    """(snapshots/<commit> folder, commit) of a file in huggingface_hub's cache."""
    for parent in local.parents:
        if parent.parent.name == "snapshots":
            return parent, parent.name
    raise UserError(f"{local}: not in a huggingface_hub cache snapshot folder")


def _files_of(local: Path, snapshot: Path) -> tuple[str, ...]:
    from evo2_hydra.checkpoint.parts import part_set

    parts = part_set(local) if PART_SUFFIX_RE.search(local.name) else None
    paths = parts.parts if parts is not None else (local,)
    return tuple(p.relative_to(snapshot).as_posix() for p in paths)


def _recorded_sizes(hub_id: HubId, commit: str) -> dict[str, int] | None:
    """Sizes the Hub records for each file at `commit` (cached tree listing; else one call)."""
    from huggingface_hub import constants, errors, get_cached_repo_tree

    try:
        return {f.path: f.size for f in get_cached_repo_tree(hub_id.repo, revision=commit)}
    except errors.CachedRepoTreeNotFoundError:
        pass
    if constants.is_offline_mode():
        return None
    from huggingface_hub import HfApi

    try:
        tree = HfApi().list_repo_tree(hub_id.repo, revision=commit, recursive=True)
        return {f.path: f.size for f in tree if hasattr(f, "size")}
    except Exception as err:  # metadata is a check, not a requirement: say so and go on
        log.warning("%s: could not read file sizes from the Hub (%s); not checked", hub_id, err)
        return None


def _check_sizes(hub_id: HubId, commit: str, snapshot: Path, files: tuple[str, ...]) -> None:
    recorded = _recorded_sizes(hub_id, commit)
    if recorded is None:
        log.debug("%s: no recorded sizes for commit %s; sizes not checked", hub_id, commit)
        return
    for name in files:
        size = (snapshot / name).stat().st_size
        if name in recorded and recorded[name] != size:
            raise UserError(
                f"{hub_id}: {snapshot / name} is {size} bytes, the Hub records {recorded[name]} "
                f"for {name} at commit {commit} (incomplete or damaged download; fetch it again: "
                f"`{hub_id.download_command()} --force-download`)"
            )
    if PART_SUFFIX_RE.search(files[-1]):  # every part the Hub lists must be here
        base = PART_SUFFIX_RE.sub("", files[-1])
        listed = {n for n in recorded if PART_SUFFIX_RE.sub("", n) == base and n != base}
        if missing := sorted(listed - set(files)):
            raise UserError(
                f"{hub_id}: {missing[0]} is missing from {snapshot} (the Hub lists {len(listed)} "
                f"parts of {base}); run `{hub_id.download_command()}`"
            )


def _offline_message(hub_id: HubId) -> str:
    """Why the offline cache cannot serve `hub_id`, and the command that would."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    repo_dir = cache / f"models--{hub_id.repo.replace('/', '--')}"
    how = f"download it first: {hub_id.download_command()}"
    mode = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub is unreachable"
    if not repo_dir.is_dir():
        return f"{hub_id}: {hub_id.repo} is not in the Hugging Face cache {cache} and {mode}; {how}"
    revision = hub_id.revision or "main"
    known = (repo_dir / "refs" / revision).is_file() or (
        COMMIT_RE.match(revision) and (repo_dir / "snapshots" / revision).is_dir()
    )
    if not known:
        refs = (
            sorted(p.name for p in (repo_dir / "refs").glob("*"))
            if (repo_dir / "refs").is_dir()
            else []
        )
        snaps = sorted(p.name[:12] for p in (repo_dir / "snapshots").glob("*"))
        return (
            f"{hub_id}: revision {revision} of {hub_id.repo} is not in the cache {cache} "
            f"(cached refs: {', '.join(refs) or 'none'}; snapshots: {', '.join(snaps) or 'none'}) "
            f"and {mode}; {how}"
        )
    what = hub_id.filename or "its checkpoint (*.pt or *.pt.partN)"
    return f"{hub_id}: {what} is not in the cached snapshot of {hub_id.repo} and {mode}; {how}"
