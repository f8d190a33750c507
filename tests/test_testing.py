"""The public property-testing kit (rank1inv.testing): strategies, assert_inverse_close."""

import numpy as np
import pytest
from hypothesis import given, settings

import rank1inv as r1
from rank1inv import testing


@settings(max_examples=300, deadline=None)
@given(testing.static_problems(dtypes=("float32", "float64", "bfloat16", "float16")))
def test_a_users_property_test(problem):
    """The guide's ten-line example, over every storage dtype."""
    G, damp, blocks, scale = problem
    op = r1.StaticInverse(G, damp, block_size=blocks, scale=scale)
    testing.assert_inverse_close(op, G, damp, scale=scale, block_sizes=op.block_sizes)


def test_assert_inverse_close_catches_a_wrong_operator():
    G = testing.gradients("lowrank", 8, 40, seed=1, dtype="float64")
    testing.assert_inverse_close(r1.StaticInverse(G, 1e-2), G, 1e-2)
    with pytest.raises(AssertionError, match="backward error"):
        testing.assert_inverse_close(r1.StaticInverse(G, 1e-2 * (1 + 1e-6)), G, 1e-2)
    with pytest.raises(AssertionError, match="backward error"):
        testing.assert_inverse_close(r1.StaticInverse(G, 1e-2, block_size=20), G, 1e-2)
    G32 = G.astype(np.float32)
    op = r1.StaticInverse(G32, 1e-2)
    op._groups()[0]._diag = op._groups()[0].diag() * (1 + 1e-5)  # a tampered cache
    with pytest.raises(AssertionError, match="diagonal"):
        testing.assert_inverse_close(op, G32, 1e-2)
