"""Render `--help` (conf/hydra/help/*.yaml) and the field reference (docs/config.md) from the schema.

Every config field is documented once, by the attribute docstring under it in
evo2_hydra/config.py; this script reads those docstrings with `ast` (no import, so no Hydra and
no torch) and writes them where users look:

    python scripts/render_help.py          # rewrite the files
    python scripts/render_help.py --check  # exit 1 when a file is out of date (tests/test_config.py)
"""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_PY = REPO / "evo2_hydra" / "config.py"
CONF = REPO / "conf"
DOC = REPO / "docs" / "config.md"
BEGIN, END = "<!-- fields:begin (scripts/render_help.py) -->", "<!-- fields:end -->"

# The fields `--help` shows first; every field is in docs/config.md.
MOST_USED = {
    "train": [
        "task", "seed", "dry_run", "ckpt.path", "ckpt.context", "data.input", "data.valid_input",
        "data.packing", "train.steps", "train.micro_batch_size", "train.grad_accum_steps",
        "train.lr", "train.zero_stage", "train.precision", "cluster.tasks", "cluster.partition",
        "cluster.nodes", "cluster.gpus_per_node", "score.input", "score.output",
        "generate.condition", "generate.n", "generate.length", "paths.output_root",
    ],
    "convert": [
        "source", "output", "overwrite", "verify", "ckpt.context", "ckpt.trust_pickle",
        "paths.output_root",
    ],
}  # fmt: skip
# Options of the target group and the fields each adds.
TARGET_SCHEMAS = {
    "vortex": "VortexTargetConfig",
    "nemo": "NemoTargetConfig",
    "savanna": "SavannaTargetConfig",
}
ENTRY = {
    "train": ("launch.py", "RunConfig", ["model", "ckpt", "data", "peft", "cluster", "recipe"]),
    "convert": ("convert.py", "ConvertConfig", ["target", "model", "ckpt"]),
}


@dataclass
class Field:
    """One schema field: name, annotation, default and its attribute docstring."""

    name: str
    annotation: str
    default: str
    doc: str
    section: str | None  # name of the dataclass this field nests, if any


def parse_schema(path: Path = CONFIG_PY) -> tuple[dict[str, list[Field]], dict[str, str]]:
    """Class name -> its fields (with attribute docstrings), and class name -> class docstring."""
    tree = ast.parse(path.read_text())
    classes: dict[str, list[Field]] = {}
    class_docs: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        class_docs[node.name] = ast.get_docstring(node) or ""
        fields: list[Field] = []
        body = node.body
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc = ""
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                doc = " ".join(str(nxt.value.value).split())
            default = ast.unparse(stmt.value) if stmt.value is not None else ""
            section = None
            if default.startswith("field(default_factory="):
                factory = default[len("field(default_factory=") : -1]
                section = factory if factory not in ("dict", "list") else None
                default = "{}" if factory == "dict" else "[]" if factory == "list" else ""
            default = default.split(".")[-1] if "." in default and "(" not in default else default
            default = {"None": "null", "True": "true", "False": "false"}.get(default, default)
            default = default.strip("'\"") if default[:1] in "'\"" else default
            fields.append(
                Field(stmt.target.id, ast.unparse(stmt.annotation), default, doc, section)
            )
        if fields:
            classes[node.name] = fields
    return classes, class_docs


def flatten(classes: dict[str, list[Field]], root: str, prefix: str = "") -> list[Field]:
    """Every leaf field under `root`, with dotted names (`train.lr`)."""
    out: list[Field] = []
    for f in classes[root]:
        name = prefix + f.name
        if f.section and f.section in classes and f.section != "TargetConfig":
            out += flatten(classes, f.section, name + ".")
        else:
            out.append(Field(name, f.annotation, f.default, f.doc, f.section))
    return out


def group_options(group: str) -> list[tuple[str, str]]:
    """(option, first comment line) for each YAML file of a config group."""
    out = []
    for path in sorted((CONF / group).glob("*.yaml")):
        comments = [
            line.lstrip("# ").strip()
            for line in path.read_text().splitlines()
            if line.startswith("#") and not line.startswith("# @package")
        ]
        out.append((path.stem, comments[0] if comments else ""))
    return out


def _line(name: str, text: str, width: int, indent: int = 2) -> list[str]:
    wrapped = textwrap.wrap(text, 100 - indent - width - 2) or [""]
    first = " " * indent + name.ljust(width) + "  " + wrapped[0]
    return [first.rstrip()] + [" " * (indent + width + 2) + w for w in wrapped[1:]]


def render_help(config_name: str, classes, class_docs) -> str:
    """The `--help` text of one entry point."""
    script, root, groups = ENTRY[config_name]
    fields = {f.name: f for f in flatten(classes, root)}
    summary = class_docs[root].splitlines()[0].split(": ", 1)[1].split(" (")[0].rstrip(".")
    out = [f"{script}: {summary}.", ""]
    if config_name == "train":
        out += [
            "Usage: python launch.py [task=TASK] [group=option ...] [key=value ...]",
            "       python launch.py -m key=a,b [cluster=slurm]   a sweep (one run per value)",
            "       python launch.py --cfg job [--resolve]        the composed config (what runs)",
            "",
            "== Tasks (task=...) ==",
        ]
        for line in class_docs["Task"].splitlines()[2:]:
            name, _, text = line.partition(":")
            out += _line(name.strip(), text.strip(), 10)
    else:
        out += [
            "Usage: python convert.py target=vortex|nemo|savanna source=PATH output=DIR [key=value ...]",
            "       python convert.py --cfg job [--resolve]        the composed config (what runs)",
        ]
    out += ["", "== Config groups (group=option) =="]
    for group in groups:
        key = "recipe@train" if group == "recipe" else group
        out.append(f"{key}:")
        for option, text in group_options(group):
            out += _line(option, text, 22, indent=4)
            if group == "target":
                for f in classes[TARGET_SCHEMAS[option]]:
                    if f.name != "kind":
                        out += _line(f"target.{f.name}", f"{f.doc} (default {f.default})", 18, 8)
    out += ["", "== Most used fields (key=value) =="]
    for name in MOST_USED[config_name]:
        f = fields[name]
        out += _line(name, f"{f.doc} (default {f.default})", 24)
    out += [
        "",
        "Every field, with its documentation: docs/config.md. Errors are one line, exit code 2.",
    ]
    return "\n".join(out) + "\n"


def help_yaml(config_name: str, classes, class_docs) -> str:
    """conf/hydra/help/<config_name>.yaml: Hydra's help config with our text as the template."""
    text = render_help(config_name, classes, class_docs).replace("${", "\\${")
    body = textwrap.indent(text, "  ")
    return (
        "# Generated by scripts/render_help.py from evo2_hydra/config.py: do not edit.\n"
        f"app_name: {ENTRY[config_name][0]}\nheader: ''\nfooter: ''\ntemplate: |\n{body}"
    )


def render_reference(classes, class_docs) -> str:
    """The markdown field reference for docs/config.md."""
    out = [BEGIN, ""]
    roots = [("launch.py", "RunConfig"), ("convert.py", "ConvertConfig")]
    for script, root in roots:
        out += [f"### {script} (`{root}`)", ""]
        sections: dict[str, list[Field]] = {}
        for f in flatten(classes, root):
            head = f.name.split(".")[0] if "." in f.name else ""
            sections.setdefault(head, []).append(f)
        for head, fs in sections.items():
            if head:
                out += [f"`{head}`:", ""]
            out += ["| field | type | default | meaning |", "|---|---|---|---|"]
            for f in fs:
                doc = f.doc.replace("|", "\\|")
                default = f.default.replace("|", "\\|")
                annotation = f.annotation.replace("|", "or")
                out.append(f"| `{f.name}` | {annotation} | `{default}` | {doc} |")
            out.append("")
    out += ["### convert.py targets", ""]
    for option, schema in TARGET_SCHEMAS.items():
        extra = [f for f in classes[schema] if f.name != "kind"]
        listed = ", ".join(f"`target.{f.name}` ({f.doc})" for f in extra) or "no options"
        out.append(f"- `target={option}`: {class_docs[schema].split(':', 1)[-1].strip()} {listed}")
    out += ["", END]
    return "\n".join(out)


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    classes, class_docs = parse_schema()
    files = {
        CONF / "hydra" / "help" / f"{name}.yaml": help_yaml(name, classes, class_docs)
        for name in ENTRY
    }
    doc = DOC.read_text()
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    files[DOC] = doc[:start] + render_reference(classes, class_docs) + doc[end:]
    return files


def main() -> int:
    """Write (or with --check, compare) every generated file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file is out of date")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(REPO)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python scripts/render_help.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
