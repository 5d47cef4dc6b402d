"""Planning: the cheapest setup that meets a target, found by pruning a search space
with memory and lower bounds before simulating what is left.

:mod:`~moesim.planning.spec` reads a plan file, :mod:`~moesim.planning.bounds` gives a
step-time lower bound without routing, :mod:`~moesim.planning.search` runs the
branch-and-bound and :mod:`~moesim.planning.frontier` keeps the Pareto frontier. New
search axes are scenario fields: they need no change here.
"""
