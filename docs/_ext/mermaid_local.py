"""MkDocs hook: pages with a diagram load the Mermaid script shipped with the site.

Material for MkDocs fetches Mermaid from a CDN unless a ``mermaid`` global exists already, so a
reader whose browser cannot reach the CDN (offline, a corporate proxy) saw the diagrams as raw
text. This hook adds ``<script src=".../javascripts/mermaid-<version>.min.js">`` to the head of
the pages that have a diagram (only those: the script is 3.5 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.utils import get_relative_url

_SCRIPT = next(iter(sorted((Path(__file__).parents[1] / "javascripts").glob("mermaid-*.min.js")))).name


def on_post_page(output: str, page: Any, config: Any) -> str:
    if 'class="mermaid"' not in output:
        return output
    src = get_relative_url(f"javascripts/{_SCRIPT}", page.url)
    return output.replace("</head>", f'<script src="{src}"></script>\n</head>', 1)
