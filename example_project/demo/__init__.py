"""The demo harness: ``make demo`` runs :mod:`demo.run`; :mod:`demo.hooks` instruments its worker.

It sits apart from the example's own app code (``shop``, ``orders``), which
knows nothing of it.
"""
