"""Evaluate a checkpoint: `python eval.py ckpt_path=<ckpt> [data=…]` (see README)."""

from advarch.eval import main

if __name__ == "__main__":
    main()
