"""The method: sparse Gaussian layers and their product kernels, Gaussian maths, removal criteria,
the subspace (remove-and-add) step, per-layer allocation and analytic FLOPs.

Nothing here knows about runs, files or the command line; models and data sit on top of it.
"""
