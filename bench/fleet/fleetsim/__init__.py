"""The fleet simulation of issue 15 (bench/fleet/README.md)."""
