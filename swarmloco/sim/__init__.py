"""The simulator (K workers in one process, bit-identical with real peers) and codec measurements."""
