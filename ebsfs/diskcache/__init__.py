"""The persistent, verified disk cache behind the memory cache (`--cache-dir`)."""
