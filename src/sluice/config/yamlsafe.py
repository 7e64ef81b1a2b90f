"""YAML loading with limits, for every configuration file Sluice reads (pipelines, contracts).

``yaml.safe_load`` already refuses arbitrary Python objects, but a small hostile file can still
exhaust memory or the stack:

* **alias expansion** ("billion laughs"): nine levels of anchors, each referencing the previous
  one nine times, stand for 9**9 nodes in a file of a few hundred bytes; whoever walks the loaded
  tree (``${VAR}`` interpolation, validation) expands them;
* **recursive aliases** (``&a [*a]``): a tree that never ends;
* **nesting depth**: ``[[[[...]]]]`` 100,000 levels deep makes PyYAML's recursive composer raise
  ``RecursionError``.

:func:`load_yaml` counts while PyYAML composes the document, before any Python object is built:
each node's size *with its aliases expanded* and its depth are computed from its children
(aliases point to nodes already counted), so a bomb is refused as soon as its expansion passes
the limit, in time and memory proportional to the file. The limits are far above what a real
pipeline or contract needs (a contract of 1,000 columns is ~20,000 nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from sluice.errors import ConfigError


@dataclass(frozen=True)
class YamlLimits:
    """Limits on one YAML document (see the module docstring)."""

    max_depth: int = 100  # nesting of mappings/sequences, aliases expanded
    max_nodes: int = 200_000  # nodes of the document with every alias expanded
    max_aliases: int = 10_000  # alias uses (``*name``)
    max_bytes: int = 16 << 20  # size of the file


LIMITS = YamlLimits()


class _Refused(Exception):
    def __init__(self, message: str, fix: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.mark = mark


class _LimitedComposer:
    """Mixin for a PyYAML ``Loader``: enforces :class:`YamlLimits` while composing."""

    limits: YamlLimits = LIMITS

    def _init_limits(self) -> None:
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        lim = self.limits
        if self.check_event(AliasEvent):  # type: ignore[attr-defined]
            event = self.peek_event()  # type: ignore[attr-defined]
            self._aliases += 1
            if self._aliases > lim.max_aliases:
                raise _Refused(
                    f"more than {lim.max_aliases:,} aliases (*name)",
                    "write the values out, or use fewer anchors",
                    event.start_mark,
                )
            target = self.anchors.get(event.anchor)  # type: ignore[attr-defined]
            if target is not None and id(target) not in self._sizes:
                raise _Refused(
                    f"alias *{event.anchor} refers to a node that contains it (a tree without end)",
                    "remove the recursive alias",
                    event.start_mark,
                )
            node: Node = super().compose_node(parent, index)  # type: ignore[misc]
            return node
        self._depth += 1
        try:
            if self._depth > lim.max_depth:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise _Refused(
                    f"mappings and lists nest deeper than {lim.max_depth} levels",
                    "flatten the structure",
                    mark,
                )
            node = super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: Node) -> None:
        lim = self.limits
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        size, depth = 1, 1
        for child in children:
            s, d = self._sizes.get(id(child), (1, 1))
            size += s
            depth = max(depth, d + 1)
        self._sizes[id(node)] = (size, depth)
        if size > lim.max_nodes:
            raise _Refused(
                f"the document stands for more than {lim.max_nodes:,} values once its aliases "
                "(*name) are expanded",
                "write the values out, or use fewer nested aliases",
                node.start_mark,
            )
        if depth > lim.max_depth:
            raise _Refused(
                f"mappings and lists nest deeper than {lim.max_depth} levels once aliases "
                "are expanded",
                "flatten the structure",
                node.start_mark,
            )


_LOADERS: dict[type, type] = {}
_RESOLVERS = (
    "yaml_constructors",
    "yaml_multi_constructors",
    "yaml_implicit_resolvers",
    "yaml_path_resolvers",
)


def _loader_class(base: type) -> type:
    """A loader with :class:`_LimitedComposer` and the constructors and implicit resolvers of
    ``base`` (a ``yaml.SafeLoader`` subclass). With libyaml available, its C parser produces
    the events (PyYAML's pure-Python scanner is quadratic on deep flow nesting: a second for a
    ``[[[[...`` line); the Python composer above it enforces the limits."""
    cls = _LOADERS.get(base)
    if cls is not None:
        return cls
    if not issubclass(base, yaml.SafeLoader):
        raise TypeError(f"{base.__name__} is not a yaml.SafeLoader subclass")
    attrs: dict[str, Any] = {name: getattr(base, name) for name in _RESOLVERS}
    parser: Any = _c_parser()
    if parser is not None:

        def c_init(self: Any, stream: Any) -> None:
            parser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
            self._init_limits()

        attrs["__init__"] = c_init
        bases: tuple[type, ...] = (_LimitedComposer, Composer, parser, SafeConstructor, Resolver)
    else:
        python_loader: Any = base

        def py_init(self: Any, stream: Any) -> None:
            python_loader.__init__(self, stream)
            self._init_limits()

        attrs["__init__"] = py_init
        bases = (_LimitedComposer, base)
    cls = type(f"Limited{base.__name__}", bases, attrs)
    _LOADERS[base] = cls
    return cls


def _c_parser() -> type | None:
    try:
        from yaml._yaml import CParser
    except ImportError:  # PyYAML built without libyaml
        return None
    return CParser


def load_yaml(
    source: str | Path,
    *,
    what: str = "file",
    where: str | None = None,
    loader: type = yaml.SafeLoader,
    limits: YamlLimits = LIMITS,
    step_id: str | None = None,
    field: str | None = None,
) -> Any:
    """Load one YAML document from a file (a :class:`~pathlib.Path`) or from text (a ``str``),
    within ``limits``. Any problem — a missing, unreadable or non-UTF-8 file, a directory, bad
    YAML syntax, a limit passed — is a :class:`~sluice.errors.ConfigError` naming the file
    (``where``, default the path) and ``what`` it is ("pipeline file", "contract"...).

    ``loader`` is the PyYAML loader class to extend (a ``yaml.SafeLoader`` subclass, e.g. one
    that keeps dates as text); ``step_id``/``field`` locate the error in a pipeline.
    """

    def fail(message: str, fix: str) -> ConfigError:
        return ConfigError(message, step_id=step_id, field=field, fix=fix)

    if isinstance(source, Path):
        name = where or str(source)
        try:
            if source.is_dir():
                raise fail(f"{what} {name!r} is a directory", f"give the path of the {what}")
            with source.open("rb") as fh:
                data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise fail(
                f"cannot read {what} {name!r}: {exc.strerror or exc}", "check the path"
            ) from None
        if len(data) > limits.max_bytes:
            raise fail(
                f"{what} {name!r} is larger than {limits.max_bytes >> 20} MiB",
                f"check that {name!r} is the {what}",
            )
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise fail(
                f"{what} {name!r} is not UTF-8 text (invalid byte at line {line})",
                "save the file as UTF-8",
            ) from None
    else:
        name = where or "<text>"
        text = source
        if len(text) > limits.max_bytes:
            raise fail(f"{what} {name!r} is larger than {limits.max_bytes >> 20} MiB", "shorten it")
    cls = _loader_class(loader)
    if limits is not LIMITS:
        cls = type(cls.__name__, (cls,), {"limits": limits})
    yl = cls(text)
    try:
        return yl.get_single_data()
    except _Refused as exc:
        raise fail(f"{what} {name!r} refused{_at(exc.mark)}: {exc.message}", exc.fix) from None
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit, met while reading ahead
            raise fail(
                f"{what} {name!r} refused{_at(getattr(exc, 'problem_mark', None))}: mappings "
                f"and lists nest deeper than {limits.max_depth} levels",
                "flatten the structure",
            ) from None
        raise fail(f"{what} {name!r} is not valid YAML: {exc}", "fix the YAML syntax") from None
    except RecursionError:  # a construct PyYAML walks recursively that the limits missed
        raise fail(
            f"{what} {name!r} refused: the YAML structure is too deeply nested",
            "flatten the structure",
        ) from None
    finally:
        yl.dispose()


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


__all__ = ["LIMITS", "YamlLimits", "load_yaml"]
