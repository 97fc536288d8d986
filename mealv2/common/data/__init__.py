"""The data path: the dataset index, crop geometry, soft-label targets, and the crop loaders."""
