"""Excerpts of real benchmark files (see README.md here) and what is derived from them."""
