"""The configuration reference, generated from the schemas: one Markdown table per section with
every key, its type, its default and the comment beside it in the source.

``python scripts/config_reference.py`` writes ``docs/configuration.md``; a test fails when that
file is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from moe_lab.config.load import Config

__all__ = ["config_keys", "field_comments", "render"]

_FIELD = re.compile(r"^    (\w+): [^=#]+(?:=.*?)?(?:  # (.*))?$")


def field_comments(schema: type) -> dict[str, str]:
    """Each field's comment in the class source: the lines of ``#`` just above it and the one
    after it on its line."""
    comments, above = {}, []
    for line in inspect.getsource(schema).splitlines():
        stripped = line.strip()
        if line.startswith("    # "):
            above.append(stripped[2:])
            continue
        match = _FIELD.match(line)
        if match:
            comments[match[1]] = " ".join([*above, match[2] or ""]).strip()
        above = []
    return comments


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # moe_lab.config.model.MoEConfig -> MoEConfig
    return text.replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "required" if str(f.default) == "???" else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section below)" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def _nested(annotation) -> type | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _section(schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    doc = (inspect.getdoc(schema) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"## `{prefix}`" if prefix else "## top level", ""] + ([doc, ""] if doc else [])
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(schema):
        sub = _nested(hints[f.name])
        key = f"{prefix}.{f.name}" if prefix else f.name
        if sub is not None and sub is not schema:
            nested.append((sub, key))
        meaning = comments.get(f.name, "").replace("|", "\\|")
        type_name = _type_name(hints[f.name]).replace("|", "\\|")
        default = _default(f)
        default = default if default.startswith("(") else f"`{default}`"
        lines.append(f"| `{key}` | {type_name} | {default} | {meaning} |")
    lines.append("")
    for sub, key in nested:
        lines += _section(sub, key)
    return lines


def config_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema`` (default: the run config), nested sections included."""
    schema = Config if schema is None else schema
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _nested(hints[f.name])
        keys += config_keys(sub, key) if sub is not None and sub is not schema else [key]
    return keys


def render(schemas: dict[str, type]) -> str:
    """Markdown for ``{title: schema}``: each schema's keys, then its nested sections'."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the schemas by `python scripts/config_reference.py`; do not edit by hand.",
        "Set any key in a YAML file or as a `key=value` override (`moe-lab train model.dim=256`).",
        "",
    ]
    for title, schema in schemas.items():
        out += [f"# {title}", ""] + _section(schema, "")
    return "\n".join(out).rstrip() + "\n"
