__version__ = "0.1.0"

# Bumped whenever the layout of saved adapters changes in a way older releases cannot read.
ADAPTER_FORMAT_VERSION = 1
