"""Removability metrics and per-layer cosine against hand-computed values."""

import json
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


def test_nothing_right_without_context_gives_undefined_harm_and_count():
    # Harm over an empty set is undefined (None, JSON null), not 0: 0 would claim "never harmed".
    m = removability_metrics([0, 0, 0], [1, 0, 1], [1, 2, 3], [1, 2, 3])
    assert m["harm"] is None and m["n_right_x"] == 0
    assert m["help"] == pytest.approx(2 / 3) and m["n_wrong_x"] == 3
    assert m["delta_len"] == 0.0
    assert json.loads(json.dumps(m))["harm"] is None  # strict JSON: null, not NaN


def test_everything_right_without_context_gives_undefined_help():
    m = removability_metrics([1, 1], [1, 0], [4, 4], [2, 6])
    assert m["help"] is None and m["n_wrong_x"] == 0
    assert m["harm"] == pytest.approx(0.5)
    assert m["delta_len"] == 0.0


def test_zero_length_without_context_gives_undefined_delta_len():
    m = removability_metrics([1, 0], [1, 1], [0, 0], [3, 1])
    assert m["delta_len"] is None
    assert m["acc_xc"] == 1.0


def test_draws_count_as_item_draw_pairs():
    # Two items x three draws. Accuracies are means over all six answers; Harm and Help are over
    # the (item, draw) pairs, so they equal the one-draw metrics of the six pairs laid out flat,
    # while `n` counts items and `draws` the draws per item.
    cx = [[1, 1, 0], [1, 0, 0]]
    cxc = [[1, 0, 1], [0, 0, 1]]
    lx, lxc = [[2, 2, 4], [4, 4, 2]], [[3, 3, 3], [6, 6, 6]]
    m = removability_metrics(cx, cxc, lx, lxc)
    flat = removability_metrics(
        np.ravel(cx), np.ravel(cxc), np.ravel(lx).tolist(), np.ravel(lxc).tolist()
    )
    assert m["n"] == 2 and m["draws"] == 3 and flat["n"] == 6 and flat["draws"] == 1
    assert m["n_right_x"] == 3 and m["n_wrong_x"] == 3
    assert m["acc_x"] == pytest.approx(3 / 6) and m["acc_xc"] == pytest.approx(3 / 6)
    assert m["both_correct"] == pytest.approx(1 / 6)
    assert m["harm"] == pytest.approx(2 / 3) and m["help"] == pytest.approx(2 / 3)
    assert m["delta_len"] == pytest.approx(4.5 / 3 - 1)
    for key in ("acc_x", "acc_xc", "both_correct", "harm", "help", "delta_len", "n_right_x"):
        assert m[key] == pytest.approx(flat[key]), key


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [], [], []), "no items"),
        (([1, 0], [1], [1, 1], [1, 1]), "share one shape"),
        (([1, 0], [1, 0], [1, 1], [1, 1, 1]), "share one shape"),
        (([[1, 0]], [[1, 0]], [1, 1], [1, 1]), "share one shape"),
        (([2, 0], [1, 0], [1, 1], [1, 1]), "correct_x"),
        (([1, 0], [1, 0], [-1, 1], [1, 1]), "len_x"),
        (([[[1, 0]]], [[[1, 0]]], [1, 1], [1, 1]), r"\[N\] or \[N, K\]"),
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
                np.dot(h_x[layer, i], h_xc[layer, i])
                / (np.linalg.norm(h_x[layer, i]) * np.linalg.norm(h_xc[layer, i]))
                for i in range(5)
            ]
        )
        for layer in range(3)
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


def test_harm_floor_hand_computed_and_absent_without_a_second_draw():
    # Six pairs right without c in the first draw; the second no-context draw misses 2 of them.
    again = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    m = removability_metrics(CORRECT_X, CORRECT_XC, [1] * 10, [1] * 10, correct_x_again=again)
    assert m["harm_floor"] == pytest.approx(2 / 6)
    assert m["excess_harm"] == pytest.approx(2 / 6 - 2 / 6)
    plain = removability_metrics(CORRECT_X, CORRECT_XC, [1] * 10, [1] * 10)
    assert "harm_floor" not in plain and "excess_harm" not in plain  # not measured, not 0
    never = removability_metrics([0, 0], [1, 0], [1, 1], [1, 1], correct_x_again=[1, 1])
    assert never["harm_floor"] is None and never["excess_harm"] is None
    with pytest.raises(ValueError, match="correct_x_again"):
        removability_metrics([1, 0], [1, 0], [1, 1], [1, 1], correct_x_again=[1, 0, 1])


def test_harm_floor_matches_its_formula_in_a_simulation_with_known_item_accuracies():
    """Items with known no-context accuracies p_i, each answered in independent draws: the floor
    converges to 1 - sum p_i^2 / sum p_i; a context that leaves each item's accuracy as it was
    gives Harm at the floor (excess 0), one that lowers it by a known amount gives that excess."""
    rng = np.random.default_rng(0)
    n, k = 20_000, 4
    p_N = rng.beta(2, 2, n)
    floor = 1 - (p_N**2).sum() / p_N.sum()

    def draws(p):
        return rng.random((n, k)) < p[:, None]

    cx, again = draws(p_N), draws(p_N)
    inert = removability_metrics(cx, draws(p_N), np.ones((n, k)), np.ones((n, k)), again)
    # Over about 40,000 right pairs the ratio's sd is under 0.003.
    assert inert["harm_floor"] == pytest.approx(floor, abs=0.01)
    assert inert["excess_harm"] == pytest.approx(0.0, abs=0.015)
    # With c, each item right with probability 0.8 p_i: Harm's expectation is
    # sum p_i (1 - 0.8 p_i) / sum p_i, so the excess over the floor is 0.2 sum p_i^2 / sum p_i.
    hurt = removability_metrics(cx, draws(0.8 * p_N), np.ones((n, k)), np.ones((n, k)), again)
    excess = 0.2 * (p_N**2).sum() / p_N.sum()
    assert hurt["excess_harm"] == pytest.approx(excess, abs=0.015)
    assert hurt["harm_floor"] == pytest.approx(inert["harm_floor"])  # the same two draws
