"""The decoder example of docs/README-decoder-example.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "README-decoder-example.md"


def test_decoder_example_runs_as_written(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "__example__"}
    exec(compile(blocks[0], str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    assert (tmp_path / "decoder.store").is_dir()
    assert len(scope["store"]) == 64 and scope["frozen"].at == "layers.1"
