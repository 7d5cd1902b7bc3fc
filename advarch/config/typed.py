"""What the user typed: this run's command-line overrides, as Hydra recorded them.

Checks that must tell a typed key from one a config file set (a task stream's length, eval's
tokenizer, a fine-tune's tokenizer keys) read them here.
"""

from __future__ import annotations


def typed_overrides() -> dict[str, str]:
    """{key: value as typed} of the command line (`trainer.max_steps` → `5`; `+`/`++`/`~`
    stripped from the key, eval's `data_overrides.` read as `data.`); empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    typed = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = str(override).lstrip("+~").partition("=")
        typed[key.replace("data_overrides.", "data.", 1)] = value
    return typed
