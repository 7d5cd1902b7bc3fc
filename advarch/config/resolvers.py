"""OmegaConf resolvers used in configs/ (registered once on import)."""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """`${unique:}` — a short random id, cached per config, so run folders never collide;
    `${range:a,b}` — [a, a+1, …, b−1], e.g. RETRO's CCA in every layer after the first at any
    depth: `cca_layers: ${range:1,${model.depth}}`."""
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: list(range(int(a), int(b))))


register_resolvers()
