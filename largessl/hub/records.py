"""The hub's records and names, shared by its store and its pages (neither owns them).

File names of the hub layout (:mod:`largessl.hub.store` describes it), the rules for model names and versions,
``NAME@VERSION`` references, and how the versions of a model's index entry are ordered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INDEX = "index.json"
INDEX_HTML = "index.html"
PAGES_DIR = "pages"
CLAIMS_DIR = "claims"
CARD = "model_card.json"
BACKBONE = "backbone.safetensors"
LATEST = "latest"
INDEX_FORMAT = "largessl-hub-index/2"
READABLE_INDEX_FORMATS = ("largessl-hub-index/1", INDEX_FORMAT)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(value: str, what: str = "name") -> str:
    """Model names and versions: letters, digits, '.', '_' and '-', not starting with a separator."""
    if not _NAME_RE.match(value or "") or value == LATEST or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' (e.g. bt-r50-in1k, v1); "
            f"'{LATEST}' is reserved for the newest version"
        )
    return value


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` or ``NAME@VERSION`` (``NAME`` and ``NAME@latest`` mean the newest version that is not yanked)."""

    name: str
    version: str = LATEST

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``bt-r50-in1k@v1``; the version defaults to ``latest``."""
        name, _, version = text.partition("@")
        check_name(name, "model name")
        if version and version != LATEST:
            check_name(version, "version")
        return cls(name, version or LATEST)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def version_order(entry: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of a version entry: commit sequence (format 2), then created time."""
    return int(entry.get("seq", 0) or 0), str(entry.get("created", ""))


def latest_version(model: Mapping[str, Any]) -> str | None:
    """The newest version of a model's index entry that is not yanked (None if every one is)."""
    live = [(version_order(e), v) for v, e in model.get("versions", {}).items() if not e.get("yanked")]
    return max(live)[1] if live else None


_HUB_ARG = re.compile(r"""hub=(?:'[^'\n]*'|"[^"\n]*")""")
_HUB_FLAG = re.compile(r"--hub (?:'[^'\n]*'|\S+)")


def rehome_snippets(snippets: Mapping[str, str], hub_url: str) -> dict[str, str]:
    """The card's load snippets pointing at ``hub_url``, the hub the reader opened, instead of the one the model
    was pushed to (a copied or mirrored hub, a mounted bucket): every ``hub='...'`` argument and ``--hub URL``
    flag is replaced."""
    import shlex

    out = {}
    for fmt, code in snippets.items():
        code = _HUB_ARG.sub(lambda _: f"hub={hub_url!r}", code)
        out[fmt] = _HUB_FLAG.sub(lambda _: f"--hub {shlex.quote(hub_url)}", code)
    return out


def human_number(v: Any, digits: int = 1) -> str:
    """A number for people: ``13.636363636363637`` → ``'13.6'``, ``100.0`` → ``'100'``; None → ``'-'``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    text = f"{v:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
