"""imedsam_core: the small torch-free foundation every imedsam package shares.

The artifact contract (``contract``), the one-line user errors (``errors``), atomic writes (``atomic``), the
runs/, export and cache paths (``paths``), the CLI helpers (``cli_common``), the 8-bit rule for image files
of other depths (``pixels``) and the picture a volume's slice becomes (``volume_view``). It imports no other
imedsam package and nothing beyond the base install.
"""
