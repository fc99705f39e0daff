"""Vendor-side training of a source model (the vendor's images never leave it)."""
