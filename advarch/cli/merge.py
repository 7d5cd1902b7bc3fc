"""Merge checkpoints (task arithmetic, TIES, DARE, SLERP, linear) into one checkpoint.

    python scripts/merge.py method=ties base=a.ckpt models=[b.ckpt,c.ckpt] density=0.2 out=m.ckpt

Settings are documented in configs/merge.yaml; the logic lives in `advarch.merging`.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

import advarch.config.resolvers  # noqa: F401  (registers ${unique:} for the run folder)

# (every method merges into `base`: the models' differences from it; linear averages them too)
USAGE = "python scripts/merge.py method={method} base=<ckpt> models=[<ckpt>,<ckpt>] out=<ckpt>"


@hydra.main(config_path="pkg://advarch.configs", config_name="merge", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Merge `models` into `base` with `method` and print a short summary."""
    from omegaconf import OmegaConf

    from advarch.merging import MergeConfig, MergeSummary, merge_checkpoints
    from advarch.output_folders import discard_run_folder

    summary = MergeSummary()
    try:
        missing = [k for k in ("base", "models", "out") if OmegaConf.is_missing(cfg, k)]
        if missing:
            raise ValueError(f"{missing[0]}= is required: {USAGE.format(method=cfg.method)}")
        raw = OmegaConf.to_container(cfg, resolve=True)
        del raw["run_name"], raw["paths"]
        base, models, out = raw.pop("base"), raw.pop("models"), raw.pop("out")
        models = [models] if isinstance(models, str) else models
        merge_cfg = MergeConfig.from_dict(raw)  # (settings first: before reading a checkpoint)
        check_one_architecture(base, models)
        path = merge_checkpoints(base, models, merge_cfg, out, summary=summary)
    except ValueError as err:  # bad config, path or tensor: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    except OSError as err:  # (inputs that cannot be read are ValueErrors: CheckpointError)
        raise SystemExit(f"error: cannot write out={cfg.out}: {err.strerror}") from None
    finally:
        discard_run_folder()  # the merged checkpoint is `out`; the run folder keeps nothing
    rows = [("base", base), *((f"models[{i}]", m) for i, m in enumerate(models))]
    rows += [("tensors merged", summary.merged), ("copied from base", summary.copied_from_base),
             ("kept from a model", summary.kept_from_model)]  # fmt: skip
    rows += [("dropped", summary.dropped)] if summary.dropped else []
    print(f"merge: {raw['method']}")  # one line per row: paths stay whole, to copy
    for key, value in [*rows, ("out", path)]:
        print(f"  {key:<18} {value}")


def check_one_architecture(base: str, models: list[str]) -> None:
    """ValueError naming the first model checkpoint whose saved config builds another
    architecture than the base's (a tensor-by-tensor error would suggest a rule instead), or
    that was trained on another tokenizer (its token ids mean other text); a warning line for
    one whose other model options differ (a soft MoE's experts under a top-2 router: the
    merged checkpoint runs with the base's)."""
    import logging

    from advarch.checkpoint import TOKENIZER, read_checkpoint, saved_hparam
    from advarch.config.runs import architecture_difference, model_option_difference
    from advarch.data.tokenizer import tokenizer_difference

    def saved(path: str, key: str) -> tuple[Any, Any]:
        ckpt = read_checkpoint(path, key, mmap=True)
        return saved_hparam(ckpt, "cfg"), ckpt.get(TOKENIZER)

    base_cfg, base_tokenizer = saved(base, "base")
    for i, path in enumerate(models):
        model_cfg, tokenizer = saved(path, f"models[{i}]")
        # (a fine-tune may untie its base's head: `merging.untie_merged_head`)
        differs = base_cfg and model_cfg and architecture_difference(base_cfg, model_cfg, True)
        # RETRO's encoder and CCA beside a model without them: not an option of one model
        retro = [(c.get("model") or {}).get("retro") for c in (base_cfg or {}, model_cfg or {})]
        if base_cfg and model_cfg and (retro[0] is None) != (retro[1] is None):
            differs = ("model.retro", *("{…}" if r else "null" for r in retro))
        if differs:
            key, here, there = differs
            raise ValueError(
                f"models[{i}]={path!r} is another architecture than base ({key}={there} there, "
                f"{here} in base={base!r}): merging needs checkpoints of one model, e.g. "
                "fine-tunes of one base"
            )
        options = base_cfg and model_cfg and model_option_difference(model_cfg, base_cfg)
        if options:
            logging.getLogger("advarch").warning(
                "models[%d]=%r differs from base in its model options (%s in base): the merged "
                "checkpoint runs with base's", i, path, options.removesuffix(" now"),
            )  # fmt: skip
        other = tokenizer_difference(tokenizer, base_tokenizer)
        if other:
            raise ValueError(
                f"models[{i}]={path!r} was trained on another tokenizer ({other[0]}) than "
                f"base={base!r} ({other[1]}): its token ids mean other text, so its weights "
                "do not add up with the base's; merge models of one tokenizer"
            )


def main() -> None:
    """The command line (`advarch-merge`): a mistyped key in one line, then Hydra."""
    from advarch.config.choices import check_command_line

    check_command_line(sys.argv[1:], "merge")
    hydra_main()


if __name__ == "__main__":
    main()
