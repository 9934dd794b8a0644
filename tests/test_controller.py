"""APF controller (SPEC §2) against hand-worked sequences.

Most tests use α = 0.5 (and T = 0.5, see `half`) so every EMA value is an exact binary fraction:
E ← E/2 + Δ/2, A ← A/2 + |Δ|/2, P = |E|/A. In SPEC terms a *stable* scalar is one whose
updates cancel out (it oscillates around its optimum, P small); a scalar that keeps
drifting the same way has P = 1 and is never frozen.
"""

from __future__ import annotations

import numpy as np
import pytest

from apf_ray.controller import BLOCK, MAX_PERIOD, APFController

# Δ per judged check for one scalar, used by the policy tests. With α = 0.5, T = 0.5:
#  j1 +1: E = .5                    A = .5                 P = 1     unstable
#  j2 -1: E = .25 - .5 = -.25       A = .25 + .5 = .75     P = .333  stable
#  j3 +1: E = -.125 + .5 = .375     A = .375 + .5 = .875   P = .429  stable
#  j4 -1: E = .1875 - .5 = -.3125   A = .4375 + .5 = .9375 P = .333  stable
#  j5 +1: E = -.15625 + .5 = .34375 A = .46875 + .5 = .96875 P = .355 stable
#  j6 +1: E = .171875 + .5 = .671875 A = .484375 + .5 = .984375 P = .683 unstable
SIX_JUDGED = [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]


def drive_one(controller: APFController, deltas: list[float], max_calls: int = 100) -> str:
    """Move scalar 0 by the next Δ on each round it is active and hold it while frozen,
    as federated training does; stop after the round that uses the last Δ.

    Returns the mask after every call: '1' active, '0' frozen.
    """
    w = np.zeros(1, dtype=np.float32)
    todo = list(deltas)
    masks = ""
    active = True
    while todo and len(masks) < max_calls:
        if active:
            w[0] += todo.pop(0)
        active = bool(controller.update(w)[0])
        masks += "1" if active else "0"
    return masks


def half(**kwargs) -> APFController:
    """α = .5, T = .5, pinned there (threshold_min = T) so tightening cannot interfere."""
    return APFController(
        np.zeros(1, dtype=np.float32), alpha=0.5, threshold=0.5, threshold_min=0.5, **kwargs
    )


# A judged check that sets period L (> 0) shows '0', then L - 1 frozen checks show '0'
# and the check where the scalar thaws shows '1': L + 1 calls, "0" * L + "1".
@pytest.mark.parametrize(
    ("policy", "masks", "final_period"),
    [
        # L after j1..j6: 0, 1, 2, 3, 4, then ⌊4/2⌋ = 2
        ("aimd", "1" + "01" + "001" + "0001" + "00001" + "0", 2),
        # L: 0, 1, 2, 3, 4, then 4 - 1 = 3 (j1 shows the floor: 0 - 1 stays 0)
        ("additive", "1" + "01" + "001" + "0001" + "00001" + "0", 3),
        # L: 0, max(1, 0) = 1, 2, 4, 8, then ⌊8/2⌋ = 4
        ("multiplicative", "1" + "01" + "001" + "00001" + "000000001" + "0", 4),
        # L: 0, 2, 2, 2, 2, then 0 (active at once)
        ("fixed:2", "1" + "001" + "001" + "001" + "001" + "1", 0),
    ],
)
def test_period_policy_sequence(policy: str, masks: str, final_period: int) -> None:
    controller = half(period_policy=policy)
    assert drive_one(controller, SIX_JUDGED) == masks
    state = controller.state_dict()
    assert state["period"][0] == final_period
    # E and A depend only on the judged Δs, not on the policy (values from j6 above).
    assert state["ema"][0] == 0.671875
    assert state["abs_ema"][0] == 0.984375
    assert controller.num_checks == len(masks)


def test_aimd_stable_scalar_freezes_for_1_2_3_4_checks() -> None:
    controller = half()
    periods = []
    w = np.zeros(1, dtype=np.float32)
    active = True
    for delta in [1.0, -1.0, 1.0, -1.0, 1.0]:  # j1..j5 above
        w[0] += delta
        active = bool(controller.update(w)[0])
        periods.append(int(controller.state_dict()["period"][0]))
        frozen_checks = 0
        while not active:  # hold it still until it thaws
            active = bool(controller.update(w)[0])
            frozen_checks += 1
        assert frozen_checks == periods[-1]
    assert periods == [0, 1, 2, 3, 4]


def test_permanent_policy_never_thaws() -> None:
    controller = half(period_policy="permanent")
    # j1 unstable (active), j2 stable -> frozen for good.
    assert drive_one(controller, SIX_JUDGED, max_calls=2) == "1" + "0"
    checks_left = controller.state_dict()["remaining"][0]
    assert drive_one(controller, [0.0] * 10, max_calls=10) == "0" * 10
    state = controller.state_dict()
    assert state["remaining"][0] == checks_left  # never counts down
    assert (state["ema"][0], state["abs_ema"][0]) == (-0.25, 0.75)  # frozen since j2
    assert controller.frozen_fraction == 1.0


def test_aimd_freeze_thaw_refreeze_halves_period_on_instability() -> None:
    controller = half()
    # j1 +1: E .5, A .5 -> unstable, L 0                          "1"
    # j2 -1: E -.25, A .75, P .333 -> stable, L 1                 "01"
    # j3 +1: E .375, A .875, P .429 -> stable, L 2                "001"
    # j4 +1: E .1875+.5 = .6875, A .9375, P .733 -> unstable,
    #        L ⌊2/2⌋ = 1: still frozen for one check              "01"
    # j5 +1: E .84375, A .96875, P .871 -> unstable, L 0          "1"
    # j6 -1: E .421875-.5 = -.078125, A .984375, P .079 -> L 1    "0"
    masks = drive_one(controller, [1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
    assert masks == "1" + "01" + "001" + "01" + "1" + "0"
    state = controller.state_dict()
    assert state["period"][0] == 1
    assert (state["ema"][0], state["abs_ema"][0]) == (-0.078125, 0.984375)


def test_oscillating_scalar_freezes_at_default_alpha_and_threshold() -> None:
    controller = APFController(np.zeros(1, dtype=np.float32))
    # check 1, Δ +.01: E = .01·.01 = 1e-4, A = 1e-4, P = 1 -> active
    assert controller.update(np.array([0.01], dtype=np.float32))[0]
    # check 2, Δ -.01: E = .99e-4 - 1e-4 = -1e-6, A = 1.99e-4, P ≈ .005 < .05 -> frozen
    assert not controller.update(np.array([0.0], dtype=np.float32))[0]
    assert controller.state_dict()["period"][0] == 1


def test_constant_drift_never_freezes_at_default_threshold() -> None:
    controller = APFController(np.zeros(1, dtype=np.float32))
    # Every Δ is +.01: E and A follow the same recursion, so P = |E|/A = 1 >= .05.
    masks = drive_one(controller, [0.01] * 50)
    assert masks == "1" * 50
    assert controller.state_dict()["period"][0] == 0


def test_zero_motion_means_p_zero_and_stable() -> None:
    controller = APFController(np.ones(2, dtype=np.float32))
    # A == 0 -> P = 0 -> stable -> L = 1: frozen for the next round.
    mask = controller.update(np.ones(2, dtype=np.float32))
    assert mask.tolist() == [False, False]
    state = controller.state_dict()
    assert state["period"].tolist() == [1, 1]
    assert state["ema"].tolist() == [0.0, 0.0] and state["abs_ema"].tolist() == [0.0, 0.0]


def test_frozen_scalar_keeps_ema_and_period_even_if_its_value_moves() -> None:
    controller = half()
    controller.update(np.array([1.0], dtype=np.float32))  # E .5, A .5, L 0
    assert not controller.update(np.array([0.0], dtype=np.float32))[0]  # E -.25, A .75, L 1
    # Frozen during this interval: Δ = +5 must be ignored; R 1 -> 0, ref <- 5.
    assert controller.update(np.array([5.0], dtype=np.float32))[0]
    state = controller.state_dict()
    assert (state["ema"][0], state["abs_ema"][0], state["period"][0]) == (-0.25, 0.75, 1)
    assert state["ref"][0] == 5.0
    # Next judged Δ is measured from the new ref: 6 - 5 = +1 -> E -.125+.5 = .375, A .875.
    controller.update(np.array([6.0], dtype=np.float32))
    state = controller.state_dict()
    assert (state["ema"][0], state["abs_ema"][0]) == (0.375, 0.875)


def test_check_every_three_accumulates_delta_over_the_interval() -> None:
    controller = APFController(np.zeros(2, dtype=np.float32), alpha=0.5, check_every=3)
    # scalar 0 never moves; scalar 1 moves +1, +2, +3 -> Δ over the interval = 6.
    assert controller.update(np.array([0, 1], dtype=np.float32)).tolist() == [True, True]
    assert controller.update(np.array([0, 3], dtype=np.float32)).tolist() == [True, True]
    assert controller.num_checks == 0
    # Check 1 (call 3): scalar 0 A = 0 -> stable, L 1; scalar 1 E = A = 6/2 = 3, P = 1.
    assert controller.update(np.array([0, 6], dtype=np.float32)).tolist() == [False, True]
    assert controller.num_checks == 1
    state = controller.state_dict()
    assert state["ema"].tolist() == [0.0, 3.0] and state["abs_ema"].tolist() == [0.0, 3.0]
    # Calls 4, 5: no check, mask unchanged; call 6 = check 2: scalar 0 thaws.
    assert controller.update(np.array([0, 6], dtype=np.float32)).tolist() == [False, True]
    assert controller.update(np.array([0, 6], dtype=np.float32)).tolist() == [False, True]
    assert controller.update(np.array([0, 6], dtype=np.float32)).tolist() == [True, True]
    assert controller.num_checks == 2


@pytest.mark.parametrize(
    ("threshold_min", "thresholds"),
    [
        # check 1: 4/5 frozen >= .8 -> .05/2 (once); check 2: all thaw -> kept;
        # check 3: 4/5 frozen again -> .025/2
        (1e-4, [0.025, 0.025, 0.0125]),
        # same, floored: max(.025, .03) = .03, max(.015, .03) = .03
        (0.03, [0.03, 0.03, 0.03]),
    ],
)
def test_tightening_halves_threshold_once_per_check_down_to_the_floor(
    threshold_min: float, thresholds: list[float]
) -> None:
    controller = APFController(
        np.zeros(5, dtype=np.float32), threshold=0.05, tighten_ratio=0.8,
        threshold_min=threshold_min,
    )
    # scalars 0-3 never move (stable); scalar 4 drifts +1 per round (unstable).
    seen, fractions = [], []
    for call in range(1, 4):
        controller.update(np.array([0, 0, 0, 0, call], dtype=np.float32))
        seen.append(controller.threshold)
        fractions.append(controller.frozen_fraction)
    assert seen == thresholds
    assert fractions == [0.8, 0.0, 0.8]


def test_aggressive_p1_freezes_unstable_scalar_for_one_check() -> None:
    controller = APFController(np.zeros(1, dtype=np.float32), aggressive_prob=1.0)
    # Drifting -> unstable every judged check; L ⌊L/2⌋ = 0 -> max(0, 1) = 1:
    # frozen one check, thawed, judged again, ...
    assert drive_one(controller, [0.01] * 10, max_calls=6) == "010101"


def test_aggressive_p0_never_freezes_unstable_scalar() -> None:
    controller = APFController(np.zeros(1, dtype=np.float32), aggressive_prob=0.0)
    assert drive_one(controller, [0.01] * 6) == "111111"


def aggressive_masks(seed: int, n: int = 1000, calls: int = 4) -> list[np.ndarray]:
    controller = APFController(np.zeros(n, dtype=np.float32), aggressive_prob=0.5, seed=seed)
    return [controller.update(np.full(n, 0.01 * call, dtype=np.float32)).copy()
            for call in range(1, calls + 1)]


def test_aggressive_masks_depend_only_on_the_seed() -> None:
    first, again, other = aggressive_masks(7), aggressive_masks(7), aggressive_masks(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    # All 1000 drift (unstable): each is frozen with probability .5 at check 1.
    assert 0.4 < 1.0 - first[0].mean() < 0.6


def random_walk(n: int, calls: int, seed: int) -> list[np.ndarray]:
    """Even scalars oscillate (stable), odd ones drift (unstable), plus small noise."""
    rng = np.random.default_rng(seed)
    oscillating = np.arange(n) % 2 == 0
    w = rng.normal(size=n).astype(np.float32)
    out = []
    for call in range(calls):
        direction = np.where(oscillating, (-1.0) ** call, 1.0)
        w = (w + 0.01 * direction + 0.001 * rng.normal(size=n)).astype(np.float32)
        out.append(w)
    return out


def test_state_restore_mid_run_reproduces_masks_and_rng(tmp_path) -> None:
    kwargs = dict(alpha=0.9, threshold=0.3, check_every=2, aggressive_prob=0.3)
    walk = random_walk(n=200, calls=19, seed=3)
    original = APFController(np.zeros(200, dtype=np.float32), seed=11, **kwargs)
    for w in walk[:7]:  # odd number of calls: mid check interval
        original.update(w)
    np.savez(tmp_path / "apf.npz", **original.state_dict())
    with np.load(tmp_path / "apf.npz") as saved:
        state = dict(saved)
    resumed = APFController(np.zeros(200, dtype=np.float32), seed=99, **kwargs)  # RNG restored
    resumed.load_state_dict(state)
    for w in walk[7:]:
        assert np.array_equal(original.update(w), resumed.update(w))
    assert original.threshold == resumed.threshold
    for key, value in original.state_dict().items():
        assert np.array_equal(value, resumed.state_dict()[key]), key


def test_a_loaded_state_is_copied_in_so_two_controllers_never_share_arrays() -> None:
    source = APFController(np.zeros(3, dtype=np.float32))
    target = APFController(np.zeros(3, dtype=np.float32))
    target.load_state_dict(source.state_dict())  # the source's live arrays (state_dict does not copy)
    source.state_dict()["remaining"][:] = 5
    assert target.active.all() and not source.active.any()


def test_load_state_dict_rejects_wrong_shape_and_missing_keys() -> None:
    state = APFController(np.zeros(3, dtype=np.float32)).state_dict()
    target = APFController(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"state\['ref'\].*\(4,\)"):
        target.load_state_dict(state)
    del state["rng_state"]
    with pytest.raises(ValueError, match=r"missing keys.*rng_state"):
        APFController(np.zeros(3, dtype=np.float32)).load_state_dict(state)


def test_vectors_longer_than_a_block_are_checked_in_full() -> None:
    n = 2 * BLOCK + 5
    drifting = np.arange(n) % 3 == 0  # moves +1 (P = 1, active); the rest stay (P = 0, frozen)
    controller = APFController(np.zeros(n, dtype=np.float32))
    mask = controller.update(drifting.astype(np.float32))
    assert np.array_equal(mask, drifting)
    assert controller.frozen_fraction == np.count_nonzero(~drifting) / n


def test_state_is_16_bytes_per_parameter() -> None:
    # ref, E, A float32 (12 B) + L, R uint16 (4 B)
    assert APFController(np.zeros(1000, dtype=np.float32)).state_nbytes == 16 * 1000


def test_periods_saturate_instead_of_wrapping() -> None:
    for policy, start, expected in [("aimd", MAX_PERIOD, MAX_PERIOD),
                                    ("multiplicative", 20000, MAX_PERIOD)]:
        controller = APFController(np.zeros(1, dtype=np.float32), period_policy=policy)
        state = controller.state_dict()
        state["period"][:] = start
        controller.load_state_dict(state)
        controller.update(np.zeros(1, dtype=np.float32))  # zero motion: stable
        assert controller.state_dict()["period"][0] == expected, policy


def test_inputs_are_copied_and_may_be_read_only() -> None:
    initial = np.zeros(3, dtype=np.float32)
    initial.flags.writeable = False
    controller = APFController(initial)
    w = np.ones(3, dtype=np.float32)
    w.flags.writeable = False
    mask = controller.update(w)
    mask[:] = False  # the returned mask belongs to the caller
    assert controller.active.all()
    assert controller.state_dict()["ref"].tolist() == [1.0, 1.0, 1.0]


def test_huge_finite_values_are_accepted() -> None:
    big = np.full(4, 3e38, dtype=np.float32)  # the float32 sum overflows, values do not
    APFController(big).update(big)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"threshold": 0.0}, "threshold"),
        ({"tighten_ratio": 0.0}, "tighten_ratio"),
        ({"tighten_ratio": 1.5}, "tighten_ratio"),
        ({"threshold_min": 0.0}, "threshold_min"),
        ({"threshold_min": 0.1}, "threshold_min"),  # above threshold 0.05
        ({"check_every": 0}, "check_every"),
        ({"check_every": 1.5}, "check_every"),
        ({"aggressive_prob": 1.5}, "aggressive_prob"),
        ({"period_policy": "tcp"}, "period_policy"),
        ({"period_policy": "fixed:0"}, "period_policy"),
        ({"period_policy": "fixed:x"}, "period_policy"),
        ({"period_policy": f"fixed:{MAX_PERIOD + 1}"}, "period_policy"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        APFController(np.zeros(3, dtype=np.float32), **kwargs)


@pytest.mark.parametrize(
    "params",
    [np.zeros((2, 2), dtype=np.float32), np.array([0.0, np.nan]), np.array([np.inf, 0.0]),
     np.zeros(0, dtype=np.float32)],
)
def test_bad_initial_params_are_rejected(params: np.ndarray) -> None:
    with pytest.raises(ValueError, match="initial_params"):
        APFController(params)


@pytest.mark.parametrize(
    "params",
    [np.zeros(4, dtype=np.float32), np.array([0.0, 0.0, np.nan]), np.zeros((3, 1))],
)
def test_bad_global_params_are_rejected(params: np.ndarray) -> None:
    controller = APFController(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="global_params"):
        controller.update(params)
