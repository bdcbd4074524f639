"""harness: seeded architecture sweeps for Keras models, with a results store and reports."""

__version__ = "0.1.0"
