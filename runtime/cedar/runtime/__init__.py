"""Shared runtime of every Cedar service."""
