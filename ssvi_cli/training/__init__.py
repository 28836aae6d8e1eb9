"""Training: the pre-flight plan (``plan``), the trainer and its step (``trainer``), the optimizer and
schedules (``optim``), run records and reports (``records``, ``summary``), stop signals (``stops``)
and data-parallel runs (``distributed``)."""
