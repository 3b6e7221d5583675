"""The benchmark, the soak and their load generator, no-op and zero-model servers: ``python -m
bench``, ``python -m bench.soak`` and friends, run from the checkout root (loopback only, bounded
in time and count). Not part of the installed ``rnnserve`` package: nothing in ``service`` imports
it."""
