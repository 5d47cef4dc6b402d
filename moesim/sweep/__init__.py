"""Sweeps: a base scenario, axes of scenario fields, one row of results per point.

:mod:`~moesim.sweep.spec` reads a sweep file and expands it into points,
:mod:`~moesim.sweep.run` simulates one point over its seeds, and
:mod:`~moesim.sweep.executors` runs many points in local processes or on Dask.
"""
