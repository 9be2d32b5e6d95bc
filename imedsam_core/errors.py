"""User-facing errors, shared by every package (this module is torch-free)."""


class UserError(Exception):
    """Bad input (file, option, data). The CLIs print ``error: <message>`` in one line and exit 2.

    Messages name the input and the problem, e.g. ``ckpt.pth: truncated or not a PyTorch checkpoint``.
    """
