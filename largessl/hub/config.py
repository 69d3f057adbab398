"""Checkpoint hub configuration."""

from __future__ import annotations

from dataclasses import dataclass

from largessl.hub.records import check_name


@dataclass
class HubConfig:
    """Where pretrained backbones are published."""

    url: str = "hub"
    """Hub root: a local directory or fsspec URL (s3://bucket/prefix)."""
    endpoint_url: str = ""
    """S3 endpoint (e.g. http://127.0.0.1:8333); empty = AWS_ENDPOINT_URL from the environment."""
    name: str = ""
    """Model name used by the `push` stage (e.g. bt-r50-in1k); empty = derived from method and arch."""
    version: str = ""
    """Version used by the `push` stage; empty = v<UTC timestamp>."""
    include_full_checkpoint: bool = False
    """Also upload the full training checkpoint (converted to safetensors + JSON) next to the backbone weights."""
    license: str = ""
    """License of the published weights (an SPDX-style id such as apache-2.0 or cc-by-nc-4.0); empty = unspecified."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if not self.url:
            raise ValueError("hub.url must be a directory or fsspec URL (default: hub)")
        if self.name:
            check_name(self.name, "hub.name")
        if self.version:
            check_name(self.version, "hub.version")
