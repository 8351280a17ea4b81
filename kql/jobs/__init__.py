"""Multi-image jobs: an application of the query engine to many images.

``SELECT ... FROM '<folder or glob>'`` is not one plan but one per image:
:class:`~kql.jobs.batch.BatchJob` reads, skips or explains every image
(:mod:`kql.jobs.batch`), keeps an append-only manifest so a rerun resumes
(:mod:`kql.jobs.manifest`), and runs locally or on Ray actors
(:mod:`kql.jobs.distributed`). Each image goes through the same compile path
as a single query (:func:`kql.compiler.compile_select`) and the executor.
"""
