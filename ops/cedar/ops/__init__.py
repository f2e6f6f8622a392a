"""Operator commands: up, replay, status, prepull."""
