"""Attention computed outside the model: exact tiles from q, k (``exact``) and the Monarch reference (``monarch``)."""
