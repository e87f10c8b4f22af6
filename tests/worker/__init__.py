"""Delivery with real worker processes, brokers and SIGKILL, each beside a plain control."""
