"""Every pipeline example in README.md and docs/ is validated and run on generated data."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import yaml

from sluice.config import parse_pipeline
from sluice.connectors.files.watch import FolderWatcher
from sluice.quality.contract import load_contract, parse_contract
from sluice.runtime.executor import Executor
from sluice.runtime.stream import StreamExecutor

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(yaml|python)\n(.*?)```", re.S)


def _blocks(kind: str) -> list[tuple[str, str]]:
    """Examples of one kind: "pipeline" and "contract" (YAML), or "python"."""
    lang = "python" if kind == "python" else "yaml"
    start = {"pipeline": "pipeline:", "contract": "name:", "python": ""}[kind]
    out = []
    for doc in DOCS:
        for i, m in enumerate(BLOCK.finditer(doc.read_text())):
            if m.group(1) == lang and m.group(2).startswith(start):
                out.append((f"{doc.name}#{i}", m.group(2)))
    return out


@pytest.fixture
def example_data(tmp_path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "examples/orders/generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(3000, tmp_path / "data")
    return tmp_path


def test_docs_have_examples() -> None:
    assert len(_blocks("pipeline")) >= 4 and len(_blocks("python")) >= 1
    assert len(_blocks("contract")) >= 1


@pytest.mark.parametrize(
    ("where", "text"), _blocks("pipeline"), ids=[w for w, _ in _blocks("pipeline")]
)
def test_yaml_examples_run(
    where: str, text: str, example_data: Path, redis_url: str, redis_prefix: str
) -> None:
    raw = yaml.safe_load(text)
    cfg = parse_pipeline(raw)
    if not cfg.streaming:
        rep = Executor(cfg, base_dir=example_data, progress=False).run()
    elif cfg.source.kind == "redis_stream":
        # the example's stream gets the example orders, one JSON message per row
        stream = f"{redis_prefix}:docs"
        raw["source"]["stream"] = stream
        raw["source"]["url"] = redis_url
        cfg = parse_pipeline(raw)
        _produce_orders(example_data, redis_url, stream)
        rep = StreamExecutor(
            cfg, base_dir=example_data, progress=False, until_idle=1.0, handle_signals=False
        ).run()
        assert rep.stream is not None and rep.stream["checkpoints"] >= 1
    else:
        assert getattr(cfg.source, "watch", False), f"{where}: no broker for {cfg.source.kind}"
        source = FolderWatcher(cfg.source, stop_when_idle=True)
        rep = StreamExecutor(
            cfg, base_dir=example_data, progress=False, source=source, handle_signals=False
        ).run()
    assert rep.status == "succeeded" and rep.balanced, where
    assert rep.rows_read > 0


def _produce_orders(folder: Path, url: str, stream: str) -> None:
    import polars as pl
    import redis

    frames = [
        pl.read_csv(
            f,
            infer_schema=False,
            ignore_errors=True,
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )
        for f in sorted((folder / "data").glob("orders-*.csv"))
    ]
    rows = pl.concat(frames, how="diagonal").write_ndjson().splitlines()
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for line in rows:
            pipe.xadd(stream, {"data": line})
        pipe.execute()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("where", "text"), _blocks("python"), ids=[w for w, _ in _blocks("python")]
)
def test_python_examples_run(where: str, text: str, example_data: Path) -> None:
    cwd = os.getcwd()
    os.chdir(example_data)
    try:
        exec(compile(text, where, "exec"), {})
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    ("where", "text"), _blocks("contract"), ids=[w for w, _ in _blocks("contract")]
)
def test_contract_examples_are_valid(where: str, text: str) -> None:
    contract = parse_contract(yaml.safe_load(text))
    assert contract.fields, where


def test_example_contract_is_valid() -> None:
    contract = load_contract(ROOT / "examples/orders/contract.yaml")
    assert contract.name == "orders"
