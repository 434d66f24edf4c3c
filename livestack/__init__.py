"""livestack: live stacking of astronomical frames while the telescope is still taking them."""

__version__ = "0.1.0"
