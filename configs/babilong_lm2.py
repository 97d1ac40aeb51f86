"""BABILong benchmark: memory kind lm2 (configs/babilong.py has the family)."""

from configs import babilong


def get_config():
  return babilong.get_config("lm2")
