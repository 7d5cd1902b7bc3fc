"""A trained language model rebuilt from its checkpoint, with what generating text needs.

`load_lm` reads the checkpoint through `advarch.checkpoint` (the one reader), rebuilds the
model and strategy (which may change the model: a fine-tune's new experts) from the config the
run saved, loads the weights and takes the tokenizer the checkpoint carries. RETRO models also
rebuild their datamodule: its retrieval database is the `retrieve` callback that `generate`
calls each time a chunk completes. Sampling itself lives in `advarch.generation`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from advarch.callbacks.data_identity import data_changed, saved_tokenizer
from advarch.checkpoint import (
    check_finite,
    load_error,
    load_with_config,
    model_weights,
    saved_hparam,
    with_cache_dir,
)
from advarch.errors import ConfigError
from advarch.generation import Retrieve
from advarch.pipeline import build_datamodule, build_model, build_optimization, build_strategy
from advarch.spec import DataSpec, ServesNeighbours, TokenizedText

log = logging.getLogger("advarch")


@dataclass
class LoadedLM:
    """A language model rebuilt from a checkpoint, with what generating text needs."""

    model: nn.Module
    spec: DataSpec  # the data it was trained on (vocabulary, context length, special ids)
    tokenizer: Any  # `encode_batch(texts)` and `decode(ids)`
    eos_id: int
    retrieve: Retrieve | None


def load_lm(ckpt_path: str, device: str = "cpu", cache_dir: str | None = None) -> LoadedLM:
    """Rebuild the decoder LM, its tokenizer and (RETRO) retriever from an advarch checkpoint;
    its data's caches in `cache_dir` (default: where the training run kept them).

    A checkpoint that carries its tokenizer needs no data: the model is built from the data
    spec the run saved, and text goes through the tokenizer it was trained with. RETRO models
    (their retrieval database) and checkpoints from before tokenizers were saved rebuild the
    run's datamodule.

    Raises:
        ConfigError: a missing file, a checkpoint without an advarch config, a model that is
            not a language model, or weights that do not fit the rebuilt model.
    """
    ckpt, saved = load_with_config(ckpt_path)
    if cache_dir is not None:
        saved = with_cache_dir(saved, cache_dir)
    tokenizer, datamodule = saved_tokenizer(ckpt), None
    saved_spec = saved_hparam(ckpt, "spec")
    if tokenizer is None or saved_spec is None or OmegaConf.select(saved, "model.retro"):
        datamodule, spec = build_datamodule(saved)
    else:
        spec = DataSpec(**saved_spec)
    if spec.kind != "lm":
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds a {spec.kind} model; generation needs a language "
            "model (data kind 'lm')"
        )
    if isinstance(datamodule, TokenizedText):
        tokenizer = tokenizer or datamodule.tokenizer
    if tokenizer is None:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds a model of token ids without text (its data, "
            f"{saved.data._target_}, has no tokenizer); generation needs a model trained on "
            "text (data=text, text_domains or text_retrieval)"
        )
    saved.strategy.pop("pretrained", None)  # weights come from the checkpoint itself
    # through the run's strategy, which may have grown the model (finetune's new experts)
    module = build_strategy(saved, build_model(saved, spec), spec, build_optimization(saved))
    model = module.model
    try:
        model.load_state_dict(model_weights(ckpt["state_dict"]))
    except RuntimeError as err:
        message = f"ckpt_path={ckpt_path!r}: weights do not fit the model: {load_error(err)}"
        raise ConfigError(message) from err
    check_finite(model, f"ckpt_path={ckpt_path!r}")
    module.on_load_checkpoint(ckpt)  # the model's state beside its weights (closed experts)
    changed = datamodule is not None and data_changed(ckpt, datamodule)
    if changed:  # its retrieval database (or tokenizer) is rebuilt from the files as they are
        log.warning("ckpt_path=%s: %s; generation may read other tokens", ckpt_path, changed)
    retrieve = datamodule_retrieve(datamodule) if getattr(model, "retro", None) else None
    return LoadedLM(model.to(device).eval(), spec, tokenizer, spec.eos_id, retrieve)


def datamodule_retrieve(datamodule: Any) -> Retrieve | None:
    """The `retrieve` callback over a prepared datamodule's retrieval database (None without)."""
    retriever = datamodule.retriever if isinstance(datamodule, ServesNeighbours) else None
    if retriever is None:
        return None

    def retrieve(chunk: torch.Tensor) -> torch.Tensor:
        return retriever.query_neighbours(chunk.cpu().numpy())  # (B, 1, K, R)

    return retrieve
