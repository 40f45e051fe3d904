"""Benchmarks: each pattern through zfabric and the same traffic through raw pyzmq, in one run (`zfabric bench`)."""
