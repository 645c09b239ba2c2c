"""Parity tests of lift's converters against the libraries' own APIs."""
