"""Launchers (`python -m launch.<name>`). Importing the package keeps freed host memory mapped
(launch/host_memory.py) before JAX starts its threads."""

from launch import host_memory

host_memory.keep_freed_memory()
