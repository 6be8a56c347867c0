"""Reporting results: result tables and bar charts of a run (:mod:`.tables`), a sweep's one-row-per-job summary
(:mod:`.sweep`), sending runs to Lightning loggers (:mod:`.loggers`), and ``mergelab-report``, which sets runs next
to a paper's published numbers (:mod:`.paper`)."""
