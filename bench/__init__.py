"""stapfarm's benchmark harness (issue 8): `python -m bench [--quick] [--out DIR]`.

Not a test: it measures and reports, and asserts nothing. See bench/README.md.
"""
