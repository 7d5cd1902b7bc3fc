"""A model class of a user's own, trained by advarch through `_target_` (see the README)."""
