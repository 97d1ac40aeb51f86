"""BABILong benchmark: memory kind hmt (configs/babilong.py has the family)."""

from configs import babilong


def get_config():
  return babilong.get_config("hmt")
