"""Build script: pure Python by default; the CUDA extension is added in csrc/ (see README)."""
from setuptools import setup

setup()
