"""Pure numeric core shared by offline evaluation and the live controller (numpy only, no I/O)."""
