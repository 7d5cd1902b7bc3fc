"""Examples of using advarch in your own project (see the README)."""
