"""The version of lfi (read by lfi/__init__.py and by setup.py)."""
__version__ = "0.1.0"
