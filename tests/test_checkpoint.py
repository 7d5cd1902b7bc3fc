"""The one checkpoint reader: every broken file is one CheckpointError line naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from advarch.checkpoint import (
    CheckpointError,
    checkpoint_file,
    describe,
    newest_readable,
    read_checkpoint,
)


def test_broken_files_name_the_key_and_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(32, 32)}, "global_step": 3}, good)
    cases = {
        "missing.ckpt": (None, "is not a file"),
        "empty.ckpt": (b"", "is an empty file"),
        # (torch's "Memo value not found at index 101", or with mmap its advice to save with
        # `_use_new_zipfile_serialization=True`)
        "notes.txt": (b"hello\n", r"is not a checkpoint file \(not a torch.save archive\)"),
        "garbage.ckpt": (b"\x01" + os.urandom(511), "is not a checkpoint file"),
        # (it added the OS error: "[Errno 22] Invalid argument")
        "truncated.ckpt": (
            good.read_bytes()[:700],
            r"is truncated or not a checkpoint \(700 bytes\)$",
        ),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            read_checkpoint(tmp_path / name, "strategy.pretrained", mmap=True)
        assert f"strategy.pretrained='{tmp_path / name}'" in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(tmp_path / "list.ckpt")
    assert read_checkpoint(good)["global_step"] == 3


def test_a_checkpoint_whose_bytes_changed_is_refused_and_auto_takes_an_older_one(
    tmp_path: Path,
) -> None:
    # torch reads a whole archive whose tensor bytes changed (a disk or copy error) as weights
    weights = torch.arange(4096, dtype=torch.float32)
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    torch.save({"state_dict": {"model.w": weights}, "global_step": 5}, old)
    torch.save({"state_dict": {"model.w": weights}, "global_step": 9}, new)
    data = bytearray(new.read_bytes())
    at = data.find(weights[2000:2002].numpy().tobytes())
    data[at : at + 8] = bytes(8)
    new.write_bytes(data)
    assert not torch.load(new)["state_dict"]["model.w"].equal(weights)  # read silently
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(new)
    assert str(refused.value) == (
        f"ckpt_path='{new}' is damaged: its record new/data/0 does not match its checksum "
        "(changed on disk or in a copy); use another checkpoint"
    )
    os.utime(old, (1, 1))
    path, ckpt, skipped, _ = newest_readable([old, new])
    assert path == old and ckpt["global_step"] == 5 and "is damaged" in skipped[0]
    # a file saved without checksums (its records' CRC-32 is 0) is read as torch reads it
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"state_dict": {"model.w": weights}}, unchecked := tmp_path / "no_crc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert read_checkpoint(unchecked)["state_dict"]["model.w"].equal(weights)


def test_newest_readable_skips_broken_newer_files(tmp_path: Path) -> None:
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    torch.save({"state_dict": {}, "global_step": 5, "epoch": 1}, old)
    new.write_bytes(b"\x00" * 100)
    os.utime(old, (1, 1))
    path, ckpt, skipped, _ = newest_readable([old, new])
    assert path == old and describe(ckpt) == "step 5, epoch 1"
    assert len(skipped) == 1 and str(new) in skipped[0]


def test_a_reason_is_cut_at_a_sentence_not_mid_word() -> None:
    from advarch.reasons import short_reason

    miniz = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central "
                         "directory. This is an internal miniz error. If you are seeing this "
                         "error, there is a high chance that your file is corrupted.")  # fmt: skip
    assert short_reason(miniz) == (
        "PytorchStreamReader failed reading zip archive: failed finding central directory."
    )
    assert short_reason(ValueError("x " * 200)).endswith("x…")
    assert short_reason(EOFError()) == "EOFError"


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("autoo", "ckpt_path='autoo' is not a file (did you mean ckpt_path=auto?)"),
        ("auto.ckpt", "ckpt_path='auto.ckpt' is not a file"),  # (a file's name, not a typo)
        ("runs/auto", "ckpt_path='runs/auto' is not a file"),
    ],
)
def test_a_missing_path_close_to_a_word_suggests_it_only_when_bare(path: str, said: str) -> None:
    with pytest.raises(CheckpointError) as missing:
        checkpoint_file(path, "ckpt_path", words=("auto",))
    assert str(missing.value) == said
