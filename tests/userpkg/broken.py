"""A module that does not import (a missing dependency), as a user's may on a compute node."""

import not_installed_dependency_xyz  # noqa: F401


def model(**kwargs):
    raise AssertionError("never reached")
