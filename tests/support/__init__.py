"""Helpers for fhirbridge's tests: real components started on loopback (see servers.py)."""
