"""Weights in and out of other frameworks."""
