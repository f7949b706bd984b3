"""Continual metrics (Average, Forgetting standard and as STELLA's scripts compute it) on hand-computed matrices."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fastav.eval import accuracy_matrix, average, continual_summary, forgetting, forgetting_official

NAN = float("nan")

# a[t, k]: R@K on task k's category after task t (3 tasks).
A3 = np.array([
    [50.0, 10.0, 20.0],
    [30.0, 60.0, 15.0],
    [40.0, 45.0, 70.0],
])  # fmt: skip
# Average: (40 + 45 + 70) / 3. Forgetting: k=1: max(50, 30) - 40 = 10; k=2: max(10, 60) - 45 = 15; mean 12.5.
# Official: 10 + 15 + (max(20, 15) - 70 = -50) = -25, divided by T - 1 = 2: -12.5.


def test_average_and_both_forgettings_on_three_tasks() -> None:
    assert average(A3) == pytest.approx(155 / 3)
    assert forgetting(A3) == pytest.approx(12.5)
    assert forgetting_official(A3) == pytest.approx(-12.5)


def test_forgetting_is_not_clipped_and_takes_the_best_earlier_value_only() -> None:
    # the category improved at the end: 50 -> 60 counts -10 (a max over all rows, the last included, would give 0;
    # clipping at 0 would give 0)
    a = np.array([[50.0, 10.0], [60.0, 40.0]])
    assert forgetting(a) == pytest.approx(-10.0)
    assert forgetting_official(a) == pytest.approx((-10.0 + (10.0 - 40.0)) / 1)
    assert average(a) == pytest.approx(50.0)


def test_forgetting_uses_the_best_of_all_earlier_rows() -> None:
    # category 1 peaks after task 2, not after task 1 or 3: drop 80 - 20 = 60; category 2: 30 - 25 = 5
    a = np.array([
        [40.0, 0.0, 0.0, 0.0],
        [80.0, 30.0, 0.0, 0.0],
        [60.0, 10.0, 50.0, 0.0],
        [20.0, 25.0, 35.0, 90.0],
    ])  # fmt: skip
    # k=3: max(0, 0, 50) - 35 = 15; mean (60 + 5 + 15) / 3 = 26.67; official adds k=4: 0 - 90, divides by 3
    assert forgetting(a) == pytest.approx(80 / 3)
    assert forgetting_official(a) == pytest.approx((60 + 5 + 15 - 90) / 3)
    assert average(a) == pytest.approx((20 + 25 + 35 + 90) / 4)


def test_one_task_has_no_forgetting() -> None:
    a = np.array([[30.0, 10.0, 20.0]])
    assert forgetting(a) is None
    assert forgetting_official(a) is None
    assert average(a) == pytest.approx(20.0)


def groups(values: dict[str, float], metric: str = "r1") -> dict:
    return {"groups": {name: {metric: v, "n": 5} for name, v in values.items()}}


def test_accuracy_matrix_reads_direction_metric_and_nan_for_missing_category() -> None:
    results = [
        {"a2v": groups({"x": 10.0, "z": 30.0}), "v2a": groups({"x": 1.0, "z": 3.0})},
        {"a2v": groups({"x": 11.0, "z": 31.0}), "v2a": groups({"x": 2.0, "z": 4.0})},
    ]
    m = accuracy_matrix(results, ["x", "y", "z"], direction="a2v", metric="r1")
    assert m.shape == (2, 3)
    np.testing.assert_array_equal(m, [[10.0, NAN, 30.0], [11.0, NAN, 31.0]])
    np.testing.assert_array_equal(
        accuracy_matrix(results, ["z", "x"], direction="v2a", metric="r1"), [[3.0, 1.0], [4.0, 2.0]]
    )


def test_a_category_without_queries_is_left_out() -> None:
    a = A3.copy()
    a[:, 1] = NAN  # the middle category has no query in the retrieval set
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" / "All-NaN slice" either
        assert average(a) == pytest.approx((40 + 70) / 2)
        assert forgetting(a) == pytest.approx(10.0)  # k=1 only
        assert forgetting_official(a) == pytest.approx((10.0 - 50.0) / 2)  # k=1 and k=3, over T - 1


def result_after(r1: dict[str, float], r5: dict[str, float], v2a_shift: float = 0.0) -> dict:
    def block(shift: float) -> dict:
        return {"groups": {t: {"r1": r1[t] + shift, "r5": r5[t] + shift, "median_rank": 3.0, "n": 4} for t in r1}}

    return {"gallery": 8, "a2v": block(0.0), "v2a": block(v2a_shift)}


def test_continual_summary_per_k_and_mean_over_k() -> None:
    tasks = ["t0", "t1", "t2"]
    results = [
        result_after(dict(zip(tasks, A3[t], strict=True)), dict(zip(tasks, A3[t] + 20, strict=True)), v2a_shift=1.0)
        for t in range(3)
    ]
    s = continual_summary(results, tasks, ks=[1, 5])
    assert s["tasks"] == tasks and s["ks"] == [1, 5] and s["trained"] == 3
    r1, r5 = s["a2v"]["per_k"]["r1"], s["a2v"]["per_k"]["r5"]
    assert r1["matrix"] == A3.tolist()
    assert r5["matrix"] == (A3 + 20).tolist()
    assert r1["average"] == pytest.approx(155 / 3) and r5["average"] == pytest.approx(155 / 3 + 20)
    assert r1["forgetting"] == pytest.approx(12.5) and r5["forgetting"] == pytest.approx(12.5)
    assert r1["forgetting_official"] == pytest.approx(-12.5) and r5["forgetting_official"] == pytest.approx(-12.5)
    mean = s["a2v"]["mean_over_k"]
    assert mean["average"] == pytest.approx(155 / 3 + 10)
    assert mean["forgetting"] == pytest.approx(12.5)
    assert mean["forgetting_official"] == pytest.approx(-12.5)
    assert s["v2a"]["per_k"]["r1"]["average"] == pytest.approx(155 / 3 + 1)  # the v2a numbers, not a2v's
    assert s["v2a"]["mean_over_k"]["average"] == pytest.approx(155 / 3 + 11)


def test_continual_summary_different_forgetting_per_k() -> None:
    tasks = ["t0", "t1"]
    # R@1: [[50, 10], [60, 40]] -> F -10; R@5: [[80, 20], [50, 90]] -> F 30; mean 10
    results = [result_after({"t0": 50.0, "t1": 10.0}, {"t0": 80.0, "t1": 20.0}),
               result_after({"t0": 60.0, "t1": 40.0}, {"t0": 50.0, "t1": 90.0})]  # fmt: skip
    s = continual_summary(results, tasks, ks=[1, 5])["a2v"]
    assert s["per_k"]["r1"]["forgetting"] == pytest.approx(-10.0)
    assert s["per_k"]["r5"]["forgetting"] == pytest.approx(30.0)
    assert s["mean_over_k"]["forgetting"] == pytest.approx(10.0)
    # official: R@1 (-10 - 30) / 1 = -40; R@5 (30 - 70) / 1 = -40
    assert s["mean_over_k"]["forgetting_official"] == pytest.approx(-40.0)
    assert s["mean_over_k"]["average"] == pytest.approx((50.0 + 70.0) / 2)


def test_continual_summary_one_task_and_missing_category() -> None:
    tasks = ["t0", "t1", "t2"]
    r1, r5 = {"t0": 12.34567, "t2": 40.0}, {"t0": 50.0, "t2": 70.0}
    s = continual_summary([result_after(r1, r5)], tasks, ks=[1, 5])
    block = s["a2v"]["per_k"]["r1"]
    assert block["matrix"] == [[12.3457, None, 40.0]]  # rounded to 4 digits; no query -> None (valid JSON)
    assert block["average"] == pytest.approx((12.34567 + 40.0) / 2)
    assert block["forgetting"] is None and block["forgetting_official"] is None
    assert s["a2v"]["mean_over_k"]["forgetting"] is None
    assert s["a2v"]["mean_over_k"]["forgetting_official"] is None
    assert s["a2v"]["mean_over_k"]["average"] == pytest.approx(((12.34567 + 40.0) / 2 + 60.0) / 2)
    assert not math.isnan(s["v2a"]["mean_over_k"]["average"])
