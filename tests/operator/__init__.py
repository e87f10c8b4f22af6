"""Tests of what operators use: the admin, the browser view of it, the commands."""
