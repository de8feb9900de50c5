"""Fixtures of the Ray tests: each module starts and stops its own Ray, and leaves no Ray
process behind."""

from __future__ import annotations

import pytest

from tests.ray.helpers import local_outputs_of, shut_down_and_check


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    yield
    shut_down_and_check()


@pytest.fixture(scope="module")
def local_outputs(reference):
    return local_outputs_of(reference[0])
