"""clipslim: make CLIP models small and fast, and prove it with numbers."""

__version__ = "0.1.0"
