"""Checkpoint hub configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HubConfig:
    """Where pretrained backbones are published."""

    url: str = "hub"
    """Hub root: a local directory or fsspec URL (s3://bucket/prefix)."""
    name: str = ""
    """Model name used by the `push` stage (e.g. bt-r50-in1k); empty = derived from method and arch."""
    version: str = ""
    """Version used by the `push` stage; empty = v<timestamp>."""
    include_full_checkpoint: bool = False
    """Also upload the full training checkpoint next to the backbone weights."""
