"""Command-line programs beyond training and evaluation, installed as `advarch-<name>`.

`scripts/<name>.py` in a checkout runs the same `main`.
"""
