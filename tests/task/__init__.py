"""Tests of DedupTask in this process: its API, reschedules, leases and owner identity."""
