"""``ssvi sweep``: the grid (``grid``), running its cells as processes (``runner``), the report
(``report``) and its figures (``figures``)."""
