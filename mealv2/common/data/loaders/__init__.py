"""Crop loaders: the registry that picks a backend, and the DALI and torch backends it names."""
