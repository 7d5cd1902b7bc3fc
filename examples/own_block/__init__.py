"""A block of a user's own (a GRU mixer), registered beside advarch's and used in its patterns."""
