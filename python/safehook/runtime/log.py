"""The one writer to the user's stderr. safehook prints nothing unless asked (SAFEHOOK_LOG=debug)
or unless protection that the policy asks for cannot be applied (warn, once per cause)."""
import os


def warn(msg):
    """One line, one write(2), prefixed 'safehook: '."""
    os.write(2, ("safehook: " + msg + "\n").encode("utf-8", "replace"))


def debug(msg):
    """A diagnostic line, only under SAFEHOOK_LOG=debug."""
    from .. import _core
    if _core.secure_getenv("SAFEHOOK_LOG") == "debug":  # the environment is not trusted under AT_SECURE
        warn(msg)
