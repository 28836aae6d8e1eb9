"""Runs on disk: the run directory and its file names (``rundir``), resumable checkpoints
(``checkpoint``), and loading a model from a file, checkpoint or run directory (``load``)."""
