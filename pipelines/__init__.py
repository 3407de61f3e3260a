"""One module per stage; each has a config dataclass next to its ``run_*()`` function."""
