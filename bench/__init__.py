"""The benchmark: the full pipeline against a raw aio-pika + PostgreSQL baseline.

Speed is measured here, never asserted in timed tests (DESIGN.md "Quality bar"). Every run
uses a fresh database and a fresh ``LASH_NAMESPACE`` and removes both afterwards, so a
benchmark never disturbs other deployments or test runs sharing the same services.

Entry points: ``python -m bench`` and ``lash-consumer bench`` (both call
:func:`bench.run.main`).
"""
