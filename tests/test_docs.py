"""The documentation site's pages: every Python block runs (``pytest -m docs``), and the site's structure holds.

Each page under ``docs/`` is one test: its ``python`` blocks run in order in one interpreter, in a fresh
directory, sharing one namespace (as a reader pasting them one after another would).  An HTML comment right
before a block changes that:

- ``<!-- docs-test: s3 -->``: the block talks to object storage; it runs against the suite's SeaweedFS server,
  its ``s3://my-bucket/...`` URLs pointed at a bucket of that server;
- ``<!-- docs-test: recycle -->``: the block needs ``actstore.recycle`` (issue #22); the page is skipped, saying
  so, while ``actstore`` lacks it;
- ``<!-- docs-test: sketch -->``: an interface sketch or a fragment with placeholders; only compiled.

The structural tests (no marker: they run in the default suite) check that every page is in the site's
navigation, that every marker is known, and that the commands the README and the development page give for
this suite are the ones that exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from snippets import run_snippets

import actstore

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<mode>[a-z0-9-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)
MODES = {None, "s3", "recycle", "sketch"}
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))



def page_blocks(page: str) -> list[dict[str, Any]]:
    text = (DOCS / page).read_text()
    return [{"page": page, "mode": m.group("mode"), "code": m.group("code"),
             "line": text[: m.start("code")].count("\n") + 1} for m in BLOCK.finditer(text)]


def test_markers_are_known() -> None:
    modes = {b["mode"] for page in PAGES for b in page_blocks(page)}
    assert modes <= MODES, f"unknown docs-test markers {modes - MODES}; known: {sorted(map(str, MODES))}"
    assert {"recycle", "s3"} <= modes, "the recycle tutorial or the S3 tutorial lost its marked blocks"
    stray = [page for page in PAGES
             if len(re.findall(r"^<!-- docs-test:", (DOCS / page).read_text(), re.M))
             != sum(b["mode"] is not None for b in page_blocks(page))]
    assert not stray, f"a docs-test marker not right before a python block in {stray}"


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [page for page in PAGES if f": {page}\n" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_the_suites_commands_are_documented() -> None:
    assert "pytest -m docs" in (ROOT / "README.md").read_text()
    assert "pytest -m docs" in (DOCS / "development.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in ci


@pytest.mark.docs
@pytest.mark.parametrize("page", [p for p in PAGES if page_blocks(p)])
def test_page_code_runs(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = page_blocks(page)
    if any(b["mode"] == "recycle" for b in blocks) and not hasattr(actstore, "recycle"):
        pytest.skip(f"{page} uses actstore.recycle, which this actstore does not have yet (issue #22)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if any(b["mode"] == "s3" for b in blocks):
        pytest.importorskip("s3fs")
        server = request.getfixturevalue("s3_server")
        bucket = server.make_bucket()
        env.update(server.env)
        for b in blocks:
            if b["mode"] == "s3":
                b["code"] = b["code"].replace("s3://my-bucket/", f"s3://{bucket}/")
    run_snippets(blocks, tmp_path, env, timeout=900)
