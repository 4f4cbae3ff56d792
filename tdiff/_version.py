# The one place the version is written: setup.py reads it, artefacts record it.
__version__ = "0.1.0"
