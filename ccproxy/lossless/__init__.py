"""Lossless mode: dropped text stays retrievable, by a tool ccproxy answers itself."""
