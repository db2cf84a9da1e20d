"""Removability metrics and per-layer cosine against hand-computed values."""

import math

import numpy as np
import pytest

from ctxjax.metrics import cosine_by_layer, format_value, markdown_table, removability_metrics

# Ten items, enumerated: 4 right in both views, 2 harmed (right -> wrong), 2 helped
# (wrong -> right), 2 wrong in both.
CORRECT_X = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
CORRECT_XC = [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]


def test_ten_items_hand_computed():
    len_x = [2] * 10  # mean 2
    len_xc = [3] * 5 + [5] * 5  # mean 4 -> twice as long
    m = removability_metrics(np.array(CORRECT_X, bool), np.array(CORRECT_XC, bool), len_x, len_xc)
    assert m["n"] == 10
    assert m["acc_x"] == pytest.approx(0.6)
    assert m["acc_xc"] == pytest.approx(0.6)
    assert m["both_correct"] == pytest.approx(0.4)
    assert m["n_right_x"] == 6 and m["n_wrong_x"] == 4
    assert m["harm"] == pytest.approx(2 / 6)
    assert m["help"] == pytest.approx(2 / 4)
    assert m["delta_len"] == pytest.approx(1.0)


def test_shorter_with_context_and_int_flags():
    # 0/1 ints are accepted as flags; lengths 10,10,10,10 -> 5,5,5,5 is delta_len = -0.5.
    m = removability_metrics([1, 0, 1, 1], [1, 0, 0, 1], [10, 10, 10, 10], [5, 5, 5, 5])
    assert m["acc_x"] == pytest.approx(0.75)
    assert m["acc_xc"] == pytest.approx(0.5)
    assert m["harm"] == pytest.approx(1 / 3)
    assert m["help"] == 0.0 and m["n_wrong_x"] == 1
    assert m["delta_len"] == pytest.approx(-0.5)


def test_nothing_right_without_context_gives_zero_harm_and_count():
    m = removability_metrics([0, 0, 0], [1, 0, 1], [1, 2, 3], [1, 2, 3])
    assert m["harm"] == 0.0 and m["n_right_x"] == 0
    assert m["help"] == pytest.approx(2 / 3)
    assert m["delta_len"] == 0.0


def test_everything_right_without_context_gives_zero_help():
    m = removability_metrics([1, 1], [1, 0], [4, 4], [2, 6])
    assert m["help"] == 0.0 and m["n_wrong_x"] == 0
    assert m["harm"] == pytest.approx(0.5)
    assert m["delta_len"] == 0.0


def test_zero_length_without_context_gives_nan_delta_len():
    m = removability_metrics([1, 0], [1, 1], [0, 0], [3, 1])
    assert math.isnan(m["delta_len"])
    assert m["acc_xc"] == 1.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [], [], []), "no items"),
        (([1, 0], [1], [1, 1], [1, 1]), "share N"),
        (([1, 0], [1, 0], [1, 1], [1, 1, 1]), "share N"),
        (([2, 0], [1, 0], [1, 1], [1, 1]), "correct_x"),
        (([1, 0], [1, 0], [-1, 1], [1, 1]), "len_x"),
        (([[1, 0]], [[1, 0]], [1, 1], [1, 1]), "1-D"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        removability_metrics(*args)


def test_cosine_hand_computed():
    h_x = np.array([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 4.0]]])
    h_xc = np.array([[[1.0, 0.0], [0.0, -3.0]], [[1.0, 0.0], [4.0, 3.0]]])
    # layer 0: cos = 1 and -1 -> mean 0; layer 1: 1/sqrt(2) and (12 + 12) / 25.
    expected = [0.0, (1 / math.sqrt(2) + 24 / 25) / 2]
    np.testing.assert_allclose(cosine_by_layer(h_x, h_xc), expected, atol=1e-12)


def test_cosine_matches_loop_reference_and_is_scale_free():
    rng = np.random.default_rng(0)
    h_x, h_xc = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 5, 7))
    ref = [
        np.mean(
            [
                np.dot(h_x[l, i], h_xc[l, i])
                / (np.linalg.norm(h_x[l, i]) * np.linalg.norm(h_xc[l, i]))
                for i in range(5)
            ]
        )
        for l in range(3)
    ]
    got = cosine_by_layer(h_x.astype(np.float32), h_xc.astype(np.float32))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(cosine_by_layer(2.0 * h_x, 0.5 * h_xc), ref, rtol=1e-10)
    np.testing.assert_allclose(cosine_by_layer(h_x, h_x), np.ones(3), rtol=1e-12)


def test_cosine_zero_vector_is_zero_not_nan():
    h_x = np.array([[[0.0, 0.0], [1.0, 0.0]]])
    h_xc = np.array([[[1.0, 2.0], [1.0, 0.0]]])
    np.testing.assert_allclose(cosine_by_layer(h_x, h_xc), [0.5])


def test_cosine_bad_shapes_raise():
    with pytest.raises(ValueError, match="L, N, D"):
        cosine_by_layer(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="L, N, D"):
        cosine_by_layer(np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="N = 0"):
        cosine_by_layer(np.zeros((2, 0, 4)), np.zeros((2, 0, 4)))


def test_markdown_table_and_format_value_hand_written():
    table = markdown_table(
        [
            {"name": "a", "x": 0.12345, "y": float("nan"), "k": 3},
            {"name": "b|c", "x": np.float32(2)},
        ],
        ["name", "x", "y", "k"],
    )
    assert table.splitlines() == [
        "| name | x | y | k |",
        "|---|---|---|---|",
        "| a | 0.123 | - | 3 |",
        "| b\\|c | 2.000 | - | - |",
    ]
    assert [format_value(v) for v in (True, None, np.int64(4), "two\nlines")] == [
        "True",
        "-",
        "4",
        "two lines",
    ]
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table([], [])
