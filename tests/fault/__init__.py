"""Fault tests: real worker processes killed, signalled and cut off from their services."""
