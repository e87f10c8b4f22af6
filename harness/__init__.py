"""The development harness: throwaway servers and claims, shared by the tests and the benchmarks.

Not part of the package that is installed; only ``make test``, ``make bench``
and the demo use it.
"""
