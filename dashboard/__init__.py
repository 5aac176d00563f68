"""The built-in dashboard: one HTML page (index.html) whose script reads the JSON API
(llamabridge/api.py). It ships inside the installed package as data, so `pip install .` serves
it as a checkout does.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources


def page_and_policy() -> tuple[bytes, str]:
    """The dashboard and the Content-Security-Policy it runs under: nothing but this origin, and
    of inline code only the page's own script and style, by hash (a value injected into the page
    could not run)."""
    page = resources.files(__name__).joinpath("index.html").read_bytes()

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block).digest()).decode()}'" for block in blocks)

    policy = (f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy
