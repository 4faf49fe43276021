# setuptools reads everything from setup.cfg except cffi_modules, which only setup() accepts.
from setuptools import setup

setup(cffi_modules=["cffi_build.py:ffibuilder"])
