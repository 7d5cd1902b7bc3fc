"""Demonstrations that train, combine and evaluate several runs (`scripts/<name>.py` runs each
one's `main`); the logic lives here so tests import it like any module."""
