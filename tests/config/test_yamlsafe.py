"""Hostile YAML is refused quickly, in bounded memory, with a ConfigError naming file and limit."""

from __future__ import annotations

import re
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sluice.cli import app
from sluice.config import load_pipeline
from sluice.config.yamlsafe import LIMITS, YamlLimits, load_yaml
from sluice.errors import ConfigError

runner = CliRunner()


def billion_laughs(levels: int = 9) -> str:
    """The classic: each anchor references the previous one nine times (9**9 'lol's)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "pipeline: lol\n" + "\n".join(lines) + "\n"


def deep(levels: int = 100_000) -> str:
    return "pipeline: deep\nsource: " + "[" * levels + "]" * levels + "\n"


def _bounded(fn: Callable[[], Any]) -> tuple[BaseException, float, int]:
    """Run ``fn`` (which must raise); return the exception, seconds and peak traced bytes."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except BaseException as exc:  # returned to the test
        caught: BaseException = exc
    else:
        raise AssertionError("no error raised")
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return caught, seconds, peak


def test_i8_17_yaml_billion_laughs_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 1000  # small on disk
    exc, seconds, peak = _bounded(lambda: load_pipeline(path))
    assert isinstance(exc, ConfigError), exc
    text = str(exc)
    assert "lol.yaml" in text and f"{LIMITS.max_nodes:,} values" in text and "aliases" in text
    assert seconds < 1.0 and peak < 50 << 20, (seconds, peak)


def test_i8_17_yaml_100k_deep_nesting_is_refused_without_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(deep())
    exc, seconds, peak = _bounded(lambda: load_pipeline(path))
    assert isinstance(exc, ConfigError), exc  # not RecursionError
    assert "deep.yaml" in str(exc) and f"deeper than {LIMITS.max_depth} levels" in str(exc)
    assert seconds < 1.0 and peak < 50 << 20, (seconds, peak)


def test_i8_17_cli_reports_the_attacks_as_config_errors(tmp_path: Path) -> None:
    for name, text in (("lol.yaml", billion_laughs()), ("deep.yaml", deep())):
        (tmp_path / name).write_text(text)
        result = runner.invoke(app, ["validate", str(tmp_path / name)])
        assert result.exit_code == 2, result.output
        assert name in result.output and "Traceback" not in result.output


def test_i8_17_recursive_alias_and_alias_count_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"alias \*a refers to a node that contains it"):
        load_yaml("a: &a [1, *a]")
    few = YamlLimits(max_aliases=3)
    text = "a: &x 1\nb: [*x, *x, *x, *x]\n"
    with pytest.raises(ConfigError, match=r"more than 3 aliases"):
        load_yaml(text, limits=few)
    assert load_yaml(text) == {"a": 1, "b": [1, 1, 1, 1]}


def test_i8_17_limits_leave_real_files_alone() -> None:
    # anchors used the ordinary way, dates, a loader that keeps dates as text (the ODCS importer)
    text = "base: &b {kind: csv, path: x.csv}\nsource: *b\nday: 2024-01-31\n"
    assert load_yaml(text) == {
        "base": {"kind": "csv", "path": "x.csv"},
        "source": {"kind": "csv", "path": "x.csv"},
        "day": __import__("datetime").date(2024, 1, 31),
    }

    class DatesAsText(yaml.SafeLoader):
        pass

    DatesAsText.add_constructor(
        "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node)
    )
    assert load_yaml(text, loader=DatesAsText)["day"] == "2024-01-31"
    # the deepest nesting allowed still loads
    nested = "[" * LIMITS.max_depth + "]" * LIMITS.max_depth
    assert load_yaml(nested) is not None


def test_i8_bad_pipeline_file_path_directory_or_encoding_is_a_config_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"pipeline: caf\xe9\n")
    cases = {
        tmp_path / "missing.yaml": "No such file",
        tmp_path: "is a directory",
        tmp_path / "latin1.yaml": "not UTF-8 text (invalid byte at line 1)",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_pipeline(path)
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
        result = runner.invoke(app, ["run", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_i8_17_limits_hold_without_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.config import yamlsafe

    monkeypatch.setattr(yamlsafe, "_c_parser", lambda: None)
    monkeypatch.setattr(yamlsafe, "_LOADERS", {})
    with pytest.raises(ConfigError, match="once its aliases"):
        load_yaml(billion_laughs())
    with pytest.raises(ConfigError, match="contains it"):
        load_yaml("a: &a [*a]")
    block = "".join("  " * i + f"k{i}:\n" for i in range(LIMITS.max_depth + 5)) + "  " * 200 + "x"
    with pytest.raises(ConfigError, match=f"deeper than {LIMITS.max_depth} levels"):
        load_yaml(block)
    with pytest.raises(ConfigError, match=f"deeper than {LIMITS.max_depth} levels"):
        load_yaml("[" * 200 + "]" * 200)
    assert load_yaml("a: &x [1]\nb: *x\n") == {"a": [1], "b": [1]}
