"""Cluster state shared through Redis: the worker registry, the prefix index, routing policy."""
