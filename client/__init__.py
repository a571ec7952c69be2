"""Clients for the granite_vision model on Triton."""
