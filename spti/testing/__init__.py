"""Test helpers shipped with the package: tiny random models and a loopback OpenAI-compatible server.

They are used by the test-suite, the benchmarks and the offline ``smoke`` preset.
"""
