"""Tests of the message-table backends: the shared contract and what each backend adds."""
