"""Train a model: `python train.py model=moe strategy=ewc data=permuted_digits` (see README)."""

from advarch.train import main

if __name__ == "__main__":
    main()
