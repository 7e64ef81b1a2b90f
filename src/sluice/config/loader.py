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

from pydantic import ValidationError

from sluice.config.models import STEP_KEYS, PipelineConfig
from sluice.config.yamlsafe import load_yaml
from sluice.errors import ConfigError, ConfigErrors

#: Where a ``${VAR}`` is a SQL literal rather than raw text: the expression fields of a
#: pipeline, as paths from its root ("*" = any key or list index). Anyone adding a field that
#: holds SQL (an expression, a statement, a quality rule) adds its path here.
SQL_FIELDS: tuple[tuple[str, ...], ...] = (
    ("steps", "*", "filter"),
    ("steps", "*", "derive", "*"),
    ("steps", "*", "sql"),
    ("steps", "*", "aggregate", "*"),
    ("steps", "*", "contract", "quality", "*", "sql"),
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SQL_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


class _Unset(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _variable(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int] | None:
    """Read the ``${NAME}`` / ``${NAME:-default}`` starting at ``text[i]`` (defaults may hold
    further variables: ``${A:-${B:-x}}``). Returns (value, index after it), or None when this
    ``${`` starts no variable (it is then kept as text). An unset variable without a default
    raises :class:`_Unset`; an unclosed one a ``ValueError``."""
    m = _NAME.match(text, i + 2)
    if m is None:
        return None
    name, j = m.group(0), m.end()
    if text.startswith("}", j):
        value = env.get(name)
        if value is None:
            raise _Unset(name)
        return value, j + 1
    if not text.startswith(":-", j):
        if j >= len(text):
            raise ValueError(f"unclosed ${{{name}: add the closing brace")
        return None
    # the default runs to the matching brace; variables inside it are expanded (as raw text)
    k, depth, parts = j + 2, 0, []
    start = k
    while k < len(text):
        if text.startswith("${", k):
            nested = None if name in env else _variable(text, k, env)
            if nested is not None:
                parts.append(text[start:k])
                parts.append(nested[0])
                k = start = nested[1]
                continue
            depth += 1  # not expanded (the variable is set, or this is no variable): skip it
            k += 2
            continue
        if text[k] == "}":
            if depth == 0:
                parts.append(text[start:k])
                value = env.get(name)
                return (value if value is not None else "".join(parts)), k + 1
            depth -= 1
        k += 1
    raise ValueError(f"unclosed ${{{name}:-...: add the closing brace")


def _substitute(text: str, env: Mapping[str, str]) -> str:
    """Raw interpolation: every variable's value replaces it as text."""
    out, i = [], 0
    while (k := text.find("${", i)) >= 0:
        var = _variable(text, k, env)
        if var is None:
            out.append(text[i : k + 2])
            i = k + 2
            continue
        out.append(text[i:k])
        out.append(var[0])
        i = var[1]
    out.append(text[i:])
    return "".join(out)


def sql_literal(value: str) -> str:
    """A variable's value as one SQL literal outside quotes: a number or true/false as such
    (signed numbers in parentheses), anything else a quoted string with its quotes doubled."""
    if _SQL_NUMBER.match(value):
        return f"({value})" if value[0] in "+-" else value
    if value.lower() in ("true", "false"):
        return value.upper()
    return "'" + value.replace("'", "''") + "'"


def _substitute_sql(text: str, env: Mapping[str, str]) -> str:
    """Interpolation inside SQL: a variable is always one literal, never SQL text.

    A small lexer follows where each ``${...}`` stands: outside quotes it becomes
    :func:`sql_literal`; inside a string literal (``'${VAR}'``) its value becomes part of that
    string (quotes doubled; backslashes too in an ``E'...'`` string); inside a quoted identifier
    (``"${VAR}"``) part of that identifier. In a comment (block comments nest, as in DuckDB) or
    a dollar-quoted string it is refused (neither can escape it), and so is a variable glued to
    a word before it (``E${VAR}`` would make an escape string of the literal)."""
    out: list[str] = []
    i, n = 0, len(text)
    state, tag = "code", ""
    escape_string = False
    depth = 0  # of nested block comments: DuckDB nests them (/* a /* b */ c */)
    while i < n:
        if text.startswith("${", i):
            var = _variable(text, i, env)
            if var is not None:
                if state == "code" and i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_&$"):
                    # E${V} / X${V} / U&${V}: a prefix would change how the literal is read
                    # (E'...' treats a backslash as an escape): a variable stands alone
                    raise ValueError(
                        f"a variable right after {text[i - 1]!r} would merge with it: put a "
                        "space or an operator between them (a variable is one whole value)"
                    )
                value, i = var
                if state == "code":
                    out.append(sql_literal(value))
                elif state == "string":
                    if escape_string:
                        value = value.replace("\\", "\\\\")
                    out.append(value.replace("'", "''"))
                elif state == "ident":
                    out.append(value.replace('"', '""'))
                else:
                    where = "a $$-quoted string" if state == "dollar" else "an SQL comment"
                    raise ValueError(f"a variable inside {where} cannot be made safe: move it out")
                continue
        c = text[i]
        if state == "code":
            if c == "'":
                state = "string"
                escape_string = (
                    i > 0
                    and text[i - 1] in "eE"
                    and (i == 1 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
                )
            elif c == '"':
                state = "ident"
            elif text.startswith("--", i):
                state = "line_comment"
            elif text.startswith("/*", i):
                state, depth = "comment", 1
                out.append("/*")
                i += 2
                continue
            elif c == "$" and (m := _DOLLAR_TAG.match(text, i)):
                state, tag = "dollar", m.group(0)
                out.append(tag)
                i = m.end()
                continue
        elif state == "string":
            if c == "\\" and escape_string and i + 1 < n:
                out.append(text[i : i + 2])
                i += 2
                continue
            if c == "'":
                if text.startswith("''", i):
                    out.append("''")
                    i += 2
                    continue
                state = "code"
        elif state == "ident":
            if c == '"':
                if text.startswith('""', i):
                    out.append('""')
                    i += 2
                    continue
                state = "code"
        elif state == "line_comment":
            if c == "\n":
                state = "code"
        elif state == "comment":
            if text.startswith("/*", i) or text.startswith("*/", i):
                depth += 1 if text[i] == "/" else -1
                state = "comment" if depth else "code"
                out.append(text[i : i + 2])
                i += 2
                continue
        elif state == "dollar" and text.startswith(tag, i):
            state = "code"
            out.append(tag)
            i += len(tag)
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _is_sql(path: tuple[str | int, ...]) -> bool:
    return any(
        len(p) == len(path) and all(a == "*" or a == b for a, b in zip(p, path, strict=True))
        for p in SQL_FIELDS
    )


def interpolate(value: Any, env: Mapping[str, str] | None = None, *, where: str = "") -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` (defaults may nest: ``${A:-${B:-x}}``) in every
    string of a YAML tree, as raw text. :func:`parse_pipeline` uses :func:`interpolate_pipeline`,
    which makes variables SQL literals in expression fields."""
    env = os.environ if env is None else env
    errors: list[ConfigError] = []
    prefix: tuple[str | int, ...] = tuple(where.split(".")) if where else ()
    result = _interpolate(value, env, prefix, errors, sql_fields=False, data=None)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return result


def interpolate_pipeline(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[ConfigError]]:
    """Interpolate a pipeline tree: raw text everywhere, SQL literals in :data:`SQL_FIELDS`.
    Returns the new tree and every problem found (unset variables, unclosed braces,
    variables that cannot be made safe), each located at its node and field."""
    env = os.environ if env is None else env
    errors: list[ConfigError] = []
    out = _interpolate(dict(data), env, (), errors, sql_fields=True, data=data)
    return out, errors


def _interpolate(
    value: Any,
    env: Mapping[str, str],
    path: tuple[str | int, ...],
    errors: list[ConfigError],
    *,
    sql_fields: bool,
    data: Mapping[str, Any] | None,
) -> Any:
    if isinstance(value, str):
        if "${" not in value:
            return value
        sql = sql_fields and _is_sql(path)
        try:
            return _substitute_sql(value, env) if sql else _substitute(value, env)
        except _Unset as exc:
            message = f"environment variable ${{{exc.name}}} is not set"
            fix = f"export {exc.name}=... or write ${{{exc.name}:-default}}"
        except ValueError as exc:
            message, fix = str(exc), "see 'Environment variables' in docs/pipelines.md"
        role, step_id, field = _locate(data, path) if data is not None else (None, None, None)
        if data is None:
            field = ".".join(map(str, path)) or None
        errors.append(ConfigError(message, step_id=step_id, field=field, fix=fix, role=role))
        return value
    if isinstance(value, list):
        return [
            _interpolate(v, env, (*path, i), errors, sql_fields=sql_fields, data=data)
            for i, v in enumerate(value)
        ]
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, (*path, str(k)), errors, sql_fields=sql_fields, data=data)
            for k, v in value.items()
        }
    return value


# ---------------------------------------------------------------------- expressions split by YAML


def _paren_balance(text: str) -> int:
    """Open minus closed parentheses outside quotes."""
    depth, quote = 0, ""
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
    return depth


def rejoin_split_expressions(
    data: Any, path: tuple[str | int, ...] = (), *, root: Mapping[str, Any] | None = None
) -> tuple[Any, list[ConfigError]]:
    """Find expressions that a YAML flow collection cut at a comma and join them again.

    In ``{p95: percentile(temperature, 0.95)}`` the comma ends the entry: YAML reads
    ``p95: "percentile(temperature"`` and a second key ``"0.95)"`` without a value (in a flow
    list, two items). A value with an unclosed parenthesis followed by valueless keys (items)
    that close it is such a cut. Each is reported (quote the expression) and joined back, so
    the rest of the file is still checked as meant."""
    errors: list[ConfigError] = []
    top = root if root is not None else (data if isinstance(data, Mapping) else {})

    def report(at: tuple[str | int, ...], joined: str, key: str | None) -> None:
        role, step_id, field = _locate(top, at)
        quoted = joined.replace('"', '\\"')
        fix = f'quote it: {key}: "{quoted}"' if key is not None else f'quote it: "{quoted}"'
        errors.append(
            ConfigError(
                "YAML cut this expression at a comma (inside {...} or [...] a comma separates "
                "entries)",
                step_id=step_id,
                field=field,
                value=joined,
                fix=fix,
                role=role,
            )
        )

    if isinstance(data, dict):
        items = list(data.items())
        out: dict[Any, Any] = {}
        i = 0
        while i < len(items):
            key, value = items[i]
            if isinstance(value, str) and _paren_balance(value) > 0:
                parts, depth, j = [value], _paren_balance(value), i + 1
                while depth > 0 and j < len(items) and items[j][1] is None:
                    piece = str(items[j][0])
                    parts.append(piece)
                    depth += _paren_balance(piece)
                    j += 1
                if depth == 0 and j > i + 1:
                    joined = ", ".join(parts)
                    report((*path, str(key)), joined, str(key))
                    out[key] = joined
                    i = j
                    continue
            sub, errs = rejoin_split_expressions(value, (*path, str(key)), root=top)
            errors.extend(errs)
            out[key] = sub
            i += 1
        return out, errors
    if isinstance(data, list):
        result: list[Any] = []
        i = 0
        while i < len(data):
            value = data[i]
            if isinstance(value, str) and _paren_balance(value) > 0:
                parts, depth, j = [value], _paren_balance(value), i + 1
                while depth > 0 and j < len(data) and isinstance(data[j], (str, int, float)):
                    parts.append(str(data[j]))
                    depth += _paren_balance(str(data[j]))
                    j += 1
                if depth == 0 and j > i + 1:
                    joined = ", ".join(parts)
                    report((*path, len(result)), joined, None)
                    result.append(joined)
                    i = j
                    continue
            sub, errs = rejoin_split_expressions(value, (*path, len(result)), root=top)
            errors.extend(errs)
            result.append(sub)
            i += 1
        return result, errors
    return data, errors


# ---------------------------------------------------------------------------------- loading


def load_pipeline(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline YAML file (read with the limits of
    :func:`sluice.config.yamlsafe.load_yaml`). Every problem is a ConfigError."""
    p = Path(path)
    raw = load_yaml(p, what="pipeline file")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p} must hold a mapping with keys pipeline, source, steps, sinks",
            value=type(raw).__name__,
            fix="start the file with 'pipeline: <name>'",
        )
    return parse_pipeline(raw, env)


def parse_pipeline(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Validate a pipeline given as a dict (as read from YAML): expressions cut by YAML,
    ``${ENV}`` interpolation, the models, the graph. Every problem is collected and raised
    together as :class:`~sluice.errors.ConfigErrors`.

    Checks that need the components themselves (a window's aggregates, an expression's
    functions, a referenced contract file) are made by
    :func:`sluice.config.validate.build_components`, which ``sluice validate`` and the executors
    call."""
    joined, errors = rejoin_split_expressions(dict(raw))
    data, var_errors = interpolate_pipeline(joined, env)
    errors.extend(var_errors)
    cfg: PipelineConfig | None = None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        # a field whose ${VAR} could not be substituted is reported once, for that reason
        unresolved = {(e.step_id, e.field) for e in var_errors}
        errors.extend(e for e in _convert(exc, data) if (e.step_id, e.field) not in unresolved)
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
                        role=kind,
                    )
                )
            refs = node.get("from", previous)
            for ref in [refs] if isinstance(refs, str) else (refs or []):
                if ref not in seen or ref in sink_ids:
                    err = _unknown_ref(nid, str(ref), [s for s in seen if s not in sink_ids])
                    err.role = kind
                    errors.append(err)
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
                        role="sink",
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


def _locate(
    data: Mapping[str, Any] | None, loc: tuple[int | str, ...]
) -> tuple[str | None, str | None, str | None]:
    """Map a location in the pipeline tree to (role, node id, field path)."""
    role, step_id, rest = _node_id(data or {}, loc)
    return role, step_id, ".".join(str(x) for x in rest) or None


def _node_id(
    data: Mapping[str, Any], loc: tuple[int | str, ...]
) -> tuple[str | None, str | None, tuple[int | str, ...]]:
    """Map a pydantic error location to (role, node id, remaining field path)."""
    if not loc:
        return None, None, loc
    head = loc[0]
    if head == "source":
        src = data.get("source")
        sid = src.get("id", "source") if isinstance(src, dict) else "source"
        return "source", str(sid), loc[1:]
    if head in ("steps", "sinks") and len(loc) > 1 and isinstance(loc[1], int | str):
        role = "step" if head == "steps" else "sink"
        items = data.get(str(head)) or []
        index = int(loc[1]) if str(loc[1]).isdigit() else -1
        item = items[index] if 0 <= index < len(items) else None
        sid = item.get("id") if isinstance(item, dict) else None
        return role, (str(sid) if sid else f"{head}[{loc[1]}]"), loc[2:]
    return None, None, loc


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
        role, step_id, rest = _node_id(data, tuple(err["loc"]))
        # drop the union tag that pydantic puts first in the location (step key or kind)
        if rest and isinstance(rest[0], str) and rest[0] in _tags():
            rest = rest[1:]
        fields = [str(x) for x in rest]
        field = ".".join(fields) or None
        msg = err["msg"].removeprefix("Value error, ")
        fix = getattr((err.get("ctx") or {}).get("error"), "fix", None) or _FIXES.get(err["type"])
        if err["type"] == "extra_forbidden" and fields:
            fix = _suggest_field(fields[-1], exc) or fix
        if err["type"] == "step_kind":
            fix = _suggest_step_key(err.get("input")) or fix
        value = err.get("input") if err["type"] not in ("missing", "step_kind") else None
        if isinstance(value, dict):
            value = None
        out.append(ConfigError(msg, step_id=step_id, field=field, value=value, fix=fix, role=role))
    return out


def _suggest_step_key(step: Any) -> str | None:
    """For a step without exactly one kind key: the key the user probably meant."""
    if not isinstance(step, dict):
        return None
    keys = [str(k) for k in step if k not in ("id", "from")]
    kinds = [k for k in keys if k in STEP_KEYS]
    if len(kinds) > 1:
        return f"a step does one thing: split {' and '.join(kinds)} into separate steps"
    for key in keys:
        close = difflib.get_close_matches(key, STEP_KEYS, n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}' (instead of '{key}')?"
    return None


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
