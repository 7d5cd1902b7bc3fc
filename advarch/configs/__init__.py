"""The Hydra configs shipped with advarch (found as `pkg://advarch.configs`)."""
