"""The processing stages, in the order a frame meets them.

Each module is pure: arrays and frozen values in, arrays and frozen values out; no threads, sockets,
logging set-up or global state. `livestack.pipeline` is the only place that wires them together.
"""
