"""MkDocs hook: what the site needs beyond the theme.

* The local copy of Mermaid must be there (``docs/build.sh`` fetches it):
  without it, Material would load Mermaid from a CDN, and the site must work
  offline.
* Chinese pages (``zh/``) say so in ``<html lang>``, which the CJK font stack
  of ``stylesheets/extra.css`` and screen readers go by.
* Chinese pages have the theme's strings in Chinese (search box, table of
  contents, footer, copy button: ``overrides/partials/language.html``): a zh
  page that still shows one of the English ones fails the build.
* The language switch leads to the same page in the other language when
  it exists (``zh/PAGE`` for ``PAGE``), else to that language's home page.
* Every page the nav lists must exist: a missing one fails the build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator, List, Tuple

log = logging.getLogger("mkdocs.hooks.site")

MERMAID = "assets/vendor/mermaid.min.js"
#: Parts of the site that others write: their pages may not exist yet.
HTML_LANG = re.compile(r'<html lang="[^"]*"')
#: The theme's English strings, as they appear in a page's HTML.
ENGLISH_CHROME = {
    "search box": re.compile(r'placeholder="Search"'),
    "table of contents": re.compile(r'aria-label="Table of contents"|>\s*Table of contents\s*<'),
    "footer": re.compile(r'md-footer__direction">\s*(Previous|Next)\s*<'),
    "copy button": re.compile(r'"clipboard\.copy": "Copy to clipboard"'),
    "skip link": re.compile(r">\s*Skip to content\s*<"),
    "back to top": re.compile(r">\s*Back to top\s*<"),
}


def english_chrome(html: str) -> List[str]:
    """The parts of the theme's chrome that ``html`` shows in English."""
    return [part for part, pattern in ENGLISH_CHROME.items() if pattern.search(html)]


def nav_pages(nav: Any, title: str = "") -> Iterator[Tuple[str, str]]:
    """(title, path) of every page in a nav, as written in mkdocs.yml."""
    if isinstance(nav, str):
        yield title, nav
    elif isinstance(nav, list):
        for item in nav:
            yield from nav_pages(item, title)
    elif isinstance(nav, dict):
        for key, value in nav.items():
            yield from nav_pages(value, key if isinstance(value, str) else "")


def missing_pages(nav: Any, existing: set) -> List[Tuple[str, str]]:
    """The nav's local pages that are not among ``existing`` (paths relative to docs/)."""
    return [(title, path) for title, path in nav_pages(nav)
            if "://" not in path and path not in existing]


def on_config(config):  # type: ignore[no-untyped-def]
    from mkdocs.exceptions import PluginError

    if not (Path(config["docs_dir"]) / MERMAID).is_file():
        raise PluginError(f"docs/{MERMAID} is missing: build with `bash docs/build.sh`, "
                          "which fetches the pinned Mermaid with npm")
    return config


def on_files(files, config):  # type: ignore[no-untyped-def]
    from mkdocs.exceptions import PluginError

    existing = {file.src_uri for file in files}
    for _, path in missing_pages(config["nav"], existing):
        raise PluginError(f"the nav lists {path!r}, which does not exist in docs/")
    global _files
    _files = files
    return files


def translation(src_uri: str, lang: str, existing: set) -> str:
    """The page to switch to in ``lang`` ("en" or "zh") from ``src_uri``."""
    english = src_uri[3:] if src_uri.startswith("zh/") else src_uri
    target = english if lang == "en" else "zh/" + english
    if target in existing:
        return target
    return "index.md" if lang == "en" else "zh/index.md"


_files = None  # the site's files, for the language switch


def on_page_context(context, page, config, nav):  # type: ignore[no-untyped-def]
    # Material renders config.extra.alternate in each page, one page at a
    # time: point its links at this page's translation.
    alternates = config["extra"].get("alternate") or []
    existing = {file.src_uri for file in _files} if _files is not None else set()
    for alternate in alternates:
        target = _files.get_file_from_path(translation(page.file.src_uri, alternate["lang"], existing))
        if target is not None:
            alternate["link"] = target.url or "."
    return context


def on_post_page(output: str, page, config) -> str:  # type: ignore[no-untyped-def]
    if page.file.src_uri.startswith("zh/"):
        from mkdocs.exceptions import PluginError

        output = HTML_LANG.sub('<html lang="zh-Hans"', output, count=1)
        english = english_chrome(output)
        if english:
            raise PluginError(f"{page.file.src_uri}: the theme's {', '.join(english)} in English "
                              "(docs/overrides/partials/language.html picks the language)")
    return output
