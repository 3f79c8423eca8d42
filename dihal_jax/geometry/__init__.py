"""Geometry proxies of hidden-state clouds (effective rank, curvature, compactness, stiffness)."""
