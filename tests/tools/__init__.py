"""Tests of the tool registry and built-in tools."""
