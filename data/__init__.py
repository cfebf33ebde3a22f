"""Data: images on disk -> scan + validate -> split manifest -> normalization statistics -> cache -> loaders,
plus the one image loader and the one preprocessing definition every stage uses.

May import: core.
"""
