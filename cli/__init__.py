"""moesim.cli: the `moesim` command line."""
