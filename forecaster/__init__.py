"""Dataset loading, the torch models, training, offline evaluation and figures.

Importing this package (and ``forecaster.core``) never imports torch: the live
controller shares the numeric core without it.
"""

KPI_NAMES: tuple[str, ...] = ("internet", "sessions", "vpn", "downstream")
TARGET = "internet"
WINDOW = 10
STEP_SECONDS = 300
