"""On-disk dataset layouts; each module turns one layout into ``ImageRecord`` lists.

Every module exposes ``looks_like_<layout>(root) -> bool`` (cheap probe used by auto-detection)
and ``read_<layout>(root) -> list[ImageRecord]``.
"""
