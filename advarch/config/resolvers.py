"""OmegaConf resolvers used in configs/ (registered once on import)."""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """`${unique:}` — a short random id, cached per config, so run folders never collide."""
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True)


register_resolvers()
