"""mkdocs hooks: publish the repository files the documentation links to, and check those links.

The pages under ``docs/`` link to files outside it with relative paths that work on a Git host
(``../benchmarks/results/store.md``, ``../actstore/engine/commit.py``).  mkdocs only knows ``docs/``, so this
hook adds every such file to the site under ``repo/<its path>`` (Markdown files become pages, their own links
followed in turn), publishes ``CHANGELOG.md`` as ``changelog.md``, and rewrites the links to point there.  A
relative link to a file that does not exist is logged as a warning, which ``mkdocs build --strict`` turns into
a failed build; links inside ``docs/`` are left to mkdocs' own checks.  The README is not part of the site,
but its relative links are checked the same way (each must name a file of the repository).
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.plugins.actstore_links")

LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
#: repository files published under a name of their own (everything else linked goes under ``repo/``)
RENAMED = {"CHANGELOG.md": "changelog.md"}

_real: dict[str, str] = {}  # site path (src_uri) -> the file's path in the repository


def _root(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def _site_path(real: str) -> str:
    if real.startswith("docs/"):
        return real[len("docs/"):]
    return RENAMED.get(real, "repo/" + real)


def _targets(text: str, real_page: str) -> list[tuple[str, str, str]]:
    """(link as written, its path in the repository, its #fragment) for each relative link outside code fences."""
    out = []
    for m in LINK.finditer(FENCE.sub("", text)):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue
        path, _, frag = target.partition("#")
        real = posixpath.normpath(posixpath.join(posixpath.dirname(real_page), path))
        out.append((target, real, frag))
    return out


def on_files(files: Files, config: Any) -> Files:
    root = _root(config)
    docs = Path(config.docs_dir).resolve().relative_to(root).as_posix()
    if docs != "docs":
        raise ValueError(f"mkdocs.yml: docs_dir must be 'docs' for these hooks, got {docs!r}; set docs_dir: docs")
    _real.clear()
    queue = [(f.src_uri, "docs/" + f.src_uri) for f in files.documentation_pages()]
    for real, site in RENAMED.items():
        files.append(File.generated(config, site, abs_src_path=str(root / real)))
        _real[site] = real
        queue.append((site, real))
    for _, real, _ in _targets((root / "README.md").read_text(encoding="utf-8"), "README.md"):
        if real.startswith("../") or not (root / real).exists():
            log.warning("README.md links to %r, which is not a file of the repository", real)
    seen = set()
    while queue:
        site, real_page = queue.pop()
        text = (root / real_page).read_text(encoding="utf-8")
        for written, real, _ in _targets(text, real_page):
            if real.startswith("docs/") or real in seen:
                continue
            seen.add(real)
            path = root / real
            if real.startswith("../") or not path.is_file():
                log.warning("%s links to %r, which is not a file of the repository (%s)", real_page, written, real)
                continue
            target_site = _site_path(real)
            if files.get_file_from_path(target_site) is None:
                files.append(File.generated(config, target_site, abs_src_path=str(path),
                                            inclusion=InclusionLevel.NOT_IN_NAV))
                _real[target_site] = real
            if real.endswith(".md"):
                queue.append((target_site, real))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    site = page.file.src_uri
    real_page = _real.get(site, "docs/" + site)
    here = posixpath.dirname(site)

    def fix(m: re.Match[str]) -> str:
        found = _targets(m.group(0), real_page)
        if not found:
            return m.group(0)
        _, real, frag = found[0]
        if real.startswith("../"):
            return m.group(0)
        new = posixpath.relpath(_site_path(real), here or ".") + ("#" + frag if frag else "")
        return m.group(1) + new + m.group(3)

    parts = []
    last = 0
    for fence in FENCE.finditer(markdown):  # leave code fences alone
        parts.append(LINK.sub(fix, markdown[last:fence.start()]))
        parts.append(fence.group(0))
        last = fence.end()
    parts.append(LINK.sub(fix, markdown[last:]))
    return "".join(parts)
