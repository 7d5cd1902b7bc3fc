"""Sample text from a language-model checkpoint, or time cached against full-forward decoding.

    python scripts/generate.py ckpt_path=<ckpt> 'prompt="def fib("' top_p=0.9 temperature=0.8
    python scripts/generate.py ckpt_path=<ckpt> prompt_file=prompt.txt greedy=true
    python scripts/generate.py bench=true

Quote a prompt with brackets or spaces for both the shell and Hydra: 'prompt="def fib("'.
Settings are documented in configs/generate.yaml; the logic lives in `advarch.generation`
(sampling), `advarch.trained_lm` (the checkpoint) and `advarch.benchmarks.decoding` (`bench=true`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig, OmegaConf

import advarch.config.resolvers  # noqa: F401  (registers ${unique:} for the run folder)
from advarch.stop_signals import Stopped, signals_held, stopping_in_one_line

BENCH_VOCAB = 259  # the benchmark models' vocabulary: bytes and 3 specials, as data=text's


@dataclass(frozen=True)
class GenerateSettings:
    """generate.yaml's settings and their types, checked before any work (see the YAML)."""

    prompt: str
    prompt_file: str | None
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    greedy: bool
    seed: int | None
    use_cache: bool
    stream: bool
    stop_at_eos: bool
    device: str
    bench: bool
    bench_models: list[str]
    bench_overrides: list[str]
    bench_prompt_len: int
    bench_new_tokens: int


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError (ValueError) for a setting of the wrong type or out of range, or a
    device torch does not have."""
    import torch

    from advarch.config.validate import check_fields
    from advarch.errors import ConfigError
    from advarch.generation import check_sampling

    check_fields(cfg, GenerateSettings)
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.max_new_tokens == 0 and not cfg.get("bench"):  # (it printed an empty line)
        raise ConfigError("max_new_tokens=0 generates nothing: it must be >= 1")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as err:
        raise ConfigError(
            f"device={cfg.device!r} is not a torch device (cpu, cuda, cuda:1 …)"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}: torch sees no CUDA device here (use device=cpu)")
    if cfg.bench:
        check_bench(cfg)


def check_bench(cfg: DictConfig) -> None:
    """Raise ConfigError for benchmark settings that cannot run, before any model is built:
    no tokens (a division by zero, or torch's negative dimension, after the models were
    built), no models (an empty table, exit 0), a model or training override the configs
    lack (Hydra's screenful, or its advice to append the key: `+model.dimm=3`)."""
    from advarch.config.choices import check_group_choices, check_overrides
    from advarch.errors import ConfigError
    from advarch.pipeline import validate

    for key in ("bench_prompt_len", "bench_new_tokens"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    check_bench_length(cfg.bench_prompt_len, cfg.bench_new_tokens, cfg.device)
    if not cfg.bench_models:
        raise ConfigError("bench_models=[] names no model to time (e.g. bench_models=[ssm,moe])")
    for name in cfg.bench_models:
        try:
            check_group_choices([f"model={name}"])
        except ConfigError as err:
            raise ConfigError(f"bench_models: {err}") from err
        try:
            check_overrides([f"model={name}", *cfg.bench_overrides], "train")
            validate(_bench_config(name, cfg.bench_overrides))  # types and ranges, as train.py
        except ConfigError as err:
            raise ConfigError(f"bench_overrides with model={name}: {err}") from err


def check_bench_length(prompt_len: int, new_tokens: int, device: str) -> None:
    """Raise ConfigError for a benchmark longer than the device's memory holds.

    The models bound no length (rotary positions, no position table; attention by SDPA's
    memory-efficient kernels): what breaks is memory, at the latest for the full forward's
    logits of every position, (1, T, V) float32 with T = prompt + new tokens (V = the bench
    vocabulary). A prompt that long failed to be allocated, with torch's traceback."""
    import torch

    from advarch.errors import ConfigError

    per_token = 4 * BENCH_VOCAB
    if device.startswith("cuda"):
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if (prompt_len + new_tokens) * per_token > memory:
        raise ConfigError(
            f"bench_prompt_len={prompt_len}: the full forward's logits of {prompt_len:,} + "
            f"{new_tokens:,} tokens alone take more than the {memory / 2**30:.0f} GiB of "
            f"device={device} (the models read any length; here at most bench_prompt_len="
            f"{memory // per_token - new_tokens:,})"
        )


def _bench(cfg: DictConfig) -> None:
    """Tokens/s of each `bench_models` config at its default size, random weights.

    RETRO models read the default corpus with `data=text_retrieval` and query its database.
    """
    import torch

    from advarch.benchmarks.decoding import benchmark_decoding, smoke_note, speed_table
    from advarch.pipeline import build_datamodule, build_model
    from advarch.spec import DataSpec
    from advarch.trained_lm import datamodule_retrieve

    torch.manual_seed(cfg.seed or 0)
    spec = DataSpec(kind="lm", vocab_size=BENCH_VOCAB, seq_len=256, eos_id=256, pad_id=257,
                    bos_id=258)  # fmt: skip
    models, retrievers = {}, {}
    for name in cfg.bench_models:
        train_cfg = _bench_config(name, cfg.bench_overrides)
        if train_cfg.model.get("retro"):
            datamodule, retro_spec = build_datamodule(train_cfg)
            retrievers[name] = datamodule_retrieve(datamodule)
            models[name] = build_model(train_cfg, retro_spec).to(cfg.device)
        else:
            models[name] = build_model(train_cfg, spec).to(cfg.device)
    rows = benchmark_decoding(models, cfg.bench_prompt_len, cfg.bench_new_tokens, retrievers)
    print(speed_table(rows, cfg.bench_prompt_len, cfg.bench_new_tokens))
    note = smoke_note(list(cfg.bench_overrides), cfg.bench_new_tokens)
    if note:
        print(note)


def _bench_config(name: str, bench_overrides: list[str]) -> DictConfig:
    """The training config of benchmark model `name` with `bench_overrides`, as train.py
    composes it (RETRO models with data=text_retrieval, `debug=tiny`'s sizes applied)."""
    from advarch.config.compose import apply_debug_sizes, compose_packaged

    overrides = [f"model={name}", *bench_overrides]
    # (not the app's `hydra.compose`: `check_bench`'s compositions reset Hydra's state)
    retro = bool(compose_packaged(overrides).model.get("retro"))
    train_cfg = compose_packaged([*(["data=text_retrieval"] if retro else []), *overrides])
    apply_debug_sizes(train_cfg, overrides)  # `debug=tiny` shrinks the models, as in train.py
    return train_cfg


def _prompt(cfg: DictConfig) -> str:
    from pathlib import Path

    from advarch.data.corpus import decode_utf8
    from advarch.errors import ConfigError

    if cfg.prompt_file is None:
        return str(cfg.prompt)
    if cfg.prompt:
        raise ConfigError("set either prompt or prompt_file, not both")
    path = Path(cfg.prompt_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt_file={cfg.prompt_file!r} is not a file")
    try:
        return decode_utf8(path.read_bytes(), "prompt_file", path)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@hydra.main(config_path="pkg://advarch.configs", config_name="generate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Generate from `ckpt_path` (or benchmark with `bench=true`); one-line errors."""
    from advarch.checkpoint import checkpoint_file
    from advarch.config.validate import import_from_working_dir
    from advarch.console_log import quiet_lightning_logs
    from advarch.errors import ConfigError
    from advarch.output_folders import discard_run_folder

    import_from_working_dir()
    echo = None
    try:
        if not cfg.bench and OmegaConf.is_missing(cfg, "ckpt_path"):
            raise ConfigError(
                "ckpt_path is required: python scripts/generate.py ckpt_path=<run>/checkpoints/"
                "last.ckpt 'prompt=\"def fib(\"' (or bench=true)"
            )
        if not cfg.bench:
            checkpoint_file(cfg.ckpt_path, "ckpt_path")  # a mistyped path: before torch loads
        check_settings(cfg)
        if cfg.bench:
            quiet_lightning_logs()
            _bench(cfg)
            return
        prompt = _prompt(cfg)
        with signals_held():  # torch's imports run Python inside C++, where a raise would abort
            quiet_lightning_logs()  # (Lightning and torch imported)
            from advarch.generation import generate_text
            from advarch.trained_lm import load_lm

        lm = load_lm(cfg.ckpt_path, cfg.device, cfg.paths.cache_dir)
        echo = PromptThenPieces(prompt) if cfg.stream else None
        text = generate_text(
            lm,
            prompt,
            cfg.max_new_tokens,
            stream=echo,
            stop_at_eos=cfg.stop_at_eos,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            greedy=cfg.greedy,
            seed=cfg.seed,
            use_cache=cfg.use_cache,
        )
    except ValueError as err:  # ConfigError included: bad keys, paths, checkpoints
        sys.exit(f"error: {err}")
    except (KeyboardInterrupt, Stopped):  # (said in one line, on a line of its own)
        if echo is not None and echo.mid_line:
            print(flush=True)
        raise
    finally:
        discard_run_folder()  # generation writes no files: leave no run folder behind
    print(echo.prompt if echo else prompt + text)  # (streamed: the prompt if nothing came)


class PromptThenPieces:
    """Prints the prompt with the first piece, then each piece as it comes: generation's
    warnings (a length beyond the trained context) come before the text, not inside it."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt  # not yet printed
        self.mid_line = False  # whether the text printed so far ends inside a line

    def __call__(self, piece: str) -> None:
        text = self.prompt + piece
        print(text, end="", flush=True)
        self.prompt = ""
        self.mid_line = not text.endswith("\n") if text else self.mid_line


def main() -> None:
    """The command line (`advarch-generate`): a mistyped key in one line, then Hydra."""
    from advarch.config.choices import check_command_line

    check_command_line(sys.argv[1:], "generate")
    with stopping_in_one_line("generation"):
        hydra_main()


if __name__ == "__main__":
    main()
