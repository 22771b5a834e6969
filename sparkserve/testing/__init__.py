"""Test support shipped with the package: tiny random models, a fake engine, oracle drafters, the
exactness (near-tie) rule, reference loops, a live-server harness.

The test suite (tests/), the soak and GPU check scripts and the drafter benchmarks use these; nothing here
is imported by the serving path. Modules that need test-only packages (transformers) import them lazily.
"""
