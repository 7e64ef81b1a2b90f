"""Load a pipeline from YAML (or a dict): ``${ENV}`` interpolation, validation, graph checks.

Every mistake is collected and raised together as :class:`~sluice.errors.ConfigErrors`, each
naming the step id, the offending value and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sluice.config.models import STEP_KEYS, PipelineConfig
from sluice.errors import ConfigError, ConfigErrors

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str] | None = None, *, where: str = "") -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of a YAML tree."""
    env = os.environ if env is None else env
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable ${{{name}}} is not set",
                field=where or None,
                fix=f"export {name}=... or write ${{{name}:-default}}",
            )

        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env, where=where) for v in value]
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, where=f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    return value


def load_pipeline(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read pipeline file {str(p)!r}: {exc.strerror}", fix="check the path"
        ) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}", fix="fix the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p} must hold a mapping with keys pipeline, source, steps, sinks",
            value=type(raw).__name__,
        )
    return parse_pipeline(raw, env)


def parse_pipeline(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Validate a pipeline given as a dict (as read from YAML)."""
    errors: list[ConfigError] = []
    try:
        data = interpolate(dict(raw), env)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None
    cfg: PipelineConfig | None = None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors.extend(_convert(exc, data))
    errors.extend(check_graph(data))
    if errors or cfg is None:
        raise ConfigErrors(errors)
    return canonical(cfg)


def canonical(cfg: PipelineConfig) -> PipelineConfig:
    """Make every edge explicit (``from`` filled in), so equal graphs compare equal however
    they were written."""

    def edge(inputs: list[str]) -> str | list[str]:
        return inputs[0] if len(inputs) == 1 else inputs

    previous = cfg.source.id
    steps = []
    for step in cfg.steps:
        steps.append(step.model_copy(update={"from_": edge(step.inputs(previous))}))
        previous = step.id
    sinks = [s.model_copy(update={"from_": edge(s.inputs(previous))}) for s in cfg.sinks]
    return cfg.model_copy(update={"steps": steps, "sinks": sinks})


def check_graph(data: Mapping[str, Any]) -> list[ConfigError]:
    """Graph rules pydantic cannot express: unique ids, ``from`` references, upsert keys.

    Works on the raw mapping so that these mistakes are reported together with field errors.
    """
    errors: list[ConfigError] = []
    src = data.get("source")
    source_id = str(src.get("id", "source")) if isinstance(src, dict) else "source"
    seen: list[str] = [source_id]
    previous = source_id
    steps = data.get("steps") or []
    sinks = data.get("sinks") or []
    sink_ids = {str(s.get("id")) for s in sinks if isinstance(s, dict)}
    for kind, nodes in (("step", steps), ("sink", sinks)):
        if not isinstance(nodes, list):
            continue
        for node in nodes:
            if not isinstance(node, dict) or not isinstance(node.get("id"), str):
                continue
            nid = node["id"]
            if nid in seen:
                errors.append(
                    ConfigError(
                        "duplicate id",
                        step_id=nid,
                        field="id",
                        fix="give every source, step and sink a unique id",
                    )
                )
            refs = node.get("from", previous)
            for ref in [refs] if isinstance(refs, str) else (refs or []):
                if ref not in seen or ref in sink_ids:
                    errors.append(
                        _unknown_ref(nid, str(ref), [s for s in seen if s not in sink_ids])
                    )
            seen.append(nid)
            if kind == "step":
                previous = nid
            elif node.get("mode") == "upsert" and not node.get("key"):
                errors.append(
                    ConfigError(
                        "mode 'upsert' needs key columns",
                        step_id=nid,
                        field="key",
                        fix="add key: [id_column]",
                    )
                )
    return errors


def _unknown_ref(step_id: str, ref: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(ref, known, n=1)
    hint = (
        f"did you mean '{close[0]}'?"
        if close
        else f"use one of the earlier ids: {', '.join(known)}"
    )
    return ConfigError(
        "'from' names no earlier step", step_id=step_id, field="from", value=ref, fix=hint
    )


def _node_id(
    data: Mapping[str, Any], loc: tuple[int | str, ...]
) -> tuple[str | None, tuple[int | str, ...]]:
    """Map a pydantic error location to (step id, remaining field path)."""
    if not loc:
        return None, loc
    head = loc[0]
    if head == "source":
        src = data.get("source")
        sid = src.get("id", "source") if isinstance(src, dict) else "source"
        return str(sid), loc[1:]
    if head in ("steps", "sinks") and len(loc) > 1 and isinstance(loc[1], int):
        items = data.get(str(head)) or []
        item = items[loc[1]] if loc[1] < len(items) else None
        sid = item.get("id") if isinstance(item, dict) else None
        return (str(sid) if sid else f"{head}[{loc[1]}]"), loc[2:]
    return None, loc


_FIXES = {
    "missing": "add this required field",
    "extra_forbidden": "remove it or check the spelling",
    "union_tag_invalid": "use one of the kinds listed",
    "literal_error": "use one of the allowed values",
    "step_kind": "write exactly one of: " + ", ".join(STEP_KEYS),
}


def _convert(exc: ValidationError, data: Mapping[str, Any]) -> list[ConfigError]:
    out: list[ConfigError] = []
    for err in exc.errors(include_url=False):
        step_id, rest = _node_id(data, tuple(err["loc"]))
        # drop the union tag that pydantic puts first in the location (step key or kind)
        if rest and isinstance(rest[0], str) and rest[0] in _tags():
            rest = rest[1:]
        fields = [str(x) for x in rest]
        field = ".".join(fields) or None
        msg = err["msg"].removeprefix("Value error, ")
        fix = getattr((err.get("ctx") or {}).get("error"), "fix", None) or _FIXES.get(err["type"])
        if err["type"] == "extra_forbidden" and fields:
            fix = _suggest_field(fields[-1], exc) or fix
        value = err.get("input") if err["type"] not in ("missing", "step_kind") else None
        if isinstance(value, dict):
            value = None
        out.append(ConfigError(msg, step_id=step_id, field=field, value=value, fix=fix))
    return out


def _tags() -> set[str]:
    from typing import get_args

    from sluice.config import models

    tags = set(STEP_KEYS)
    for cls in vars(models).values():
        if isinstance(cls, type) and issubclass(cls, models.Model) and "kind" in cls.model_fields:
            tags.update(get_args(cls.model_fields["kind"].annotation))
    return tags


def _suggest_field(name: str, exc: ValidationError) -> str | None:
    from sluice.config import models

    known: set[str] = set()
    for cls in vars(models).values():
        if isinstance(cls, type) and issubclass(cls, models.Model):
            for fname, f in cls.model_fields.items():
                known.add(f.alias or fname)
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean '{close[0]}'?" if close else None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file (for editors: yaml-language-server, VS Code...)."""
    schema = PipelineConfig.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Sluice pipeline"
    return schema
