"""The benchmark's tasks and the one table they write."""
