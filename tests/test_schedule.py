"""DreamDDP's schedule and time model against hand-computed values and brute force."""

import itertools
import json
import random

import pytest

from edit_jax.errors import UserError
from edit_jax.schedule import (UnitProfile, comm_seconds, dreamddp_schedule,
                               format_schedule_report, full_sync_seconds, iteration_seconds,
                               iteration_wait, load_profile, mean_iteration_seconds,
                               plsgd_schedule, save_profile, schedule_report)

# Greedy "average now" loses to deferring here (solved by hand in
# test_dreamddp_defers_when_averaging_now_costs_more). Backward ends B = 1, 2, 3, 5.
HAND = UnitProfile(names=("layer 2", "layer 1", "layer 0", "rest"),
                   backward_seconds=(1.0, 1.0, 1.0, 2.0), comm_seconds=(3.0, 2.0, 1.0, 1.0),
                   forward_seconds=1.0)


def total_wait(profile, schedule):
    return sum(iteration_wait(profile, units) for units in schedule)


def contiguous_schedules(num_units, period):
    """Every cut of 0..num_units-1 into `period` contiguous, possibly empty, groups in order."""
    for cuts in itertools.combinations_with_replacement(range(num_units + 1), period - 1):
        starts = (0, *cuts, num_units)
        yield tuple(frozenset(range(a, b)) for a, b in zip(starts, starts[1:]))


def random_profile(rng, num_units):
    return UnitProfile(names=tuple(f"u{k}" for k in range(num_units)),
                       backward_seconds=tuple(rng.uniform(0.1, 1.0) for _ in range(num_units)),
                       comm_seconds=tuple(rng.uniform(0.0, 2.0) for _ in range(num_units)))


def test_iteration_wait_queues_communication_in_backward_order():
    profile = UnitProfile(names=("a", "b", "c"), backward_seconds=(1.0, 2.0, 3.0),
                          comm_seconds=(4.0, 1.0, 2.0), forward_seconds=0.5)
    # Backward ends B = 1, 3, 6.
    # {0, 1, 2}: a runs 1..5; b is ready at 3 but queues behind a: 5..6; c runs 6..8: wait 8 - 6.
    assert iteration_wait(profile, [2, 0, 1]) == 2.0
    # {0, 1}: a 1..5, b 5..6: ends at the end of the backward, nothing exposed.
    assert iteration_wait(profile, {0, 1}) == 0.0
    # {1}: b 3..4, hidden; {1, 2}: b 3..4, c 6..8: 2 exposed.
    assert iteration_wait(profile, [1]) == 0.0
    assert iteration_wait(profile, [1, 2]) == 2.0
    assert iteration_wait(profile, []) == 0.0
    assert iteration_seconds(profile, [0, 1, 2]) == 0.5 + 6.0 + 2.0
    with pytest.raises(UserError, match="outside 0..2"):
        iteration_wait(profile, [3])


def test_comm_seconds_of_a_ring_all_reduce():
    # 4 replicas send 2 * 3/4 * 1 GB = 1.5 GB = 12 Gbit; at 10 Gbit/s 1.2 s, plus 5 ms latency.
    assert comm_seconds(1e9, link_gbps=10, latency_ms=5, num_replicas=4) == pytest.approx(1.205)
    assert comm_seconds(1e9, link_gbps=10, latency_ms=5, num_replicas=1) == 0.0
    with pytest.raises(UserError, match="link_gbps > 0"):
        comm_seconds(1e9, link_gbps=0, latency_ms=5, num_replicas=4)


def test_plsgd_splits_the_units_evenly_larger_groups_first():
    s = [frozenset(x) for x in ({0}, {1}, {2}, {3}, {4}, (), (), ())]
    assert plsgd_schedule(5, 8) == tuple(s)
    assert plsgd_schedule(8, 4) == tuple(map(frozenset, ({0, 1}, {2, 3}, {4, 5}, {6, 7})))
    assert plsgd_schedule(7, 3) == tuple(map(frozenset, ({0, 1, 2}, {3, 4}, {5, 6})))
    with pytest.raises(UserError, match="period is 0"):
        plsgd_schedule(7, 0)


def test_dreamddp_defers_when_averaging_now_costs_more():
    # B = 1, 2, 3, 5 and c = 3, 2, 1, 1, period 2.
    # Unit 0 alone: 1..4 <= 5, hidden, so it is packed into iteration 0.
    # Unit 1 with it: 1..4, 4..6: wait 1, so branch.
    #   Average 1 now. Unit 2: 1..4, 4..6, 6..7: wait 2, branch again.
    #     Now: unit 3 runs 7..8, wait 3, in iteration 0 (total 3) or alone in iteration 1
    #     (5..6, wait 1; total 2 + 1 = 3).
    #     Defer 2: iteration 0 = {0, 1} (wait 1), iteration 1 = {2, 3}: 3..4, 5..6, wait 1: total 2.
    #   Defer 1: iteration 0 = {0} (wait 0); iteration 1 = {1, 2, 3}: 2..4, 4..5, 5..6: wait 1.
    # Best: ({0}, {1, 2, 3}) with total wait 1; averaging everything at once waits 3.
    unfilled = dreamddp_schedule(HAND, 2, fill_bubbles=False)
    assert unfilled == (frozenset({0}), frozenset({1, 2, 3}))
    assert total_wait(HAND, unfilled) == 1.0
    assert iteration_wait(HAND, range(4)) == 3.0
    # Bubbles: iteration 0 also takes unit 2 (1..4, 4..5: still hidden), not 1 (wait 1) nor 3
    # (5..6: wait 1); iteration 1 cannot take unit 0 (0 then 1..4, 4..6, 6..7, 7..8: wait 3).
    filled = dreamddp_schedule(HAND, 2)
    assert filled == (frozenset({0, 2}), frozenset({1, 2, 3}))
    assert total_wait(HAND, filled) == 1.0


def test_dreamddp_averages_now_on_ties():
    # B = 1, 2, 3, 4 and c = 2, 2, 1, 1, period 2. Unit 0: 1..3, hidden, packed. With unit 1:
    # 1..3, 3..5: wait 1, branch.
    #   Now, then defer 2: {0, 1} waits 1; {2, 3}: 3..4, 4..5, waits 1: total 2 (keeping 2 in
    #   iteration 0 waits 2 there and at least 1 more for unit 3: 3).
    #   Defer 1: {0} waits 0; {1, 2, 3}: 2..4, 4..5, 5..6 waits 2: total 2 as well.
    # The tie goes to averaging unit 1 now.
    profile = UnitProfile(names=tuple("abcd"), backward_seconds=(1.0,) * 4,
                          comm_seconds=(2.0, 2.0, 1.0, 1.0))
    assert dreamddp_schedule(profile, 2, fill_bubbles=False) == (frozenset({0, 1}),
                                                                 frozenset({2, 3}))
    # Bubbles: iteration 1 takes unit 0 (1..3, 3..4, 4..5: still waits 1), not unit 1 (3).
    assert dreamddp_schedule(profile, 2) == (frozenset({0, 1}), frozenset({0, 2, 3}))


def test_dreamddp_packs_everything_when_communication_hides():
    # The last unit in backward order has no backward left to hide under, so it sends nothing.
    profile = UnitProfile(names=tuple("abcd"), backward_seconds=(1.0,) * 4,
                          comm_seconds=(0.1, 0.1, 0.1, 0.0))
    assert dreamddp_schedule(profile, 3, fill_bubbles=False) == (
        frozenset(range(4)), frozenset(), frozenset())
    # Bubble filling then averages every unit in every iteration, still for free.
    assert dreamddp_schedule(profile, 3) == (frozenset(range(4)),) * 3
    assert total_wait(profile, dreamddp_schedule(profile, 3)) == 0.0


def test_dreamddp_covers_every_unit_when_a_wait_is_unavoidable():
    # B = 1, 2, 3. Unit 1's 10 s all-reduce starts at 2 and ends at 12 at the earliest: whatever
    # iteration holds it waits >= 9; unit 2's starts at 3 (the end): whichever holds it waits
    # >= 0.5, and together 2..12, 12..12.5 waits 9.5. So the least total wait is 9.5.
    profile = UnitProfile(names=tuple("abc"), backward_seconds=(1.0, 1.0, 1.0),
                          comm_seconds=(0.5, 10.0, 0.5))
    for fill in (False, True):
        schedule = dreamddp_schedule(profile, 3, fill_bubbles=fill)
        assert len(schedule) == 3
        assert set().union(*schedule) == {0, 1, 2}
        assert total_wait(profile, schedule) == 9.5
    # Unit 0 (0.5 s from 1) hides, unit 1 waits 9 alone or with 0; averaging 2 with them (9.5)
    # ties with deferring it (9 + 0.5): it goes now.
    assert dreamddp_schedule(profile, 3, fill_bubbles=False) == (
        frozenset({0, 1, 2}), frozenset(), frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_dreamddp_is_optimal_over_contiguous_schedules(seed):
    rng = random.Random(seed)
    for num_units, period in [(3, 2), (4, 3), (5, 2), (5, 4), (6, 3), (4, 1)]:
        profile = random_profile(rng, num_units)
        schedule = dreamddp_schedule(profile, period, fill_bubbles=False)
        assert len(schedule) == period and set().union(*schedule) == set(range(num_units))

        def packs(candidate):
            """Each unit that opens a later iteration would have been exposed in the one before."""
            for i, units in enumerate(candidate[:-1]):
                following = sum(map(len, candidate[:i + 1]))
                if following < num_units and iteration_wait(profile, units | {following}) == 0:
                    return False
            return True

        assert schedule in set(contiguous_schedules(num_units, period)) and packs(schedule)
        packed = [c for c in contiguous_schedules(num_units, period) if packs(c)]
        best = min(total_wait(profile, c) for c in packed)
        assert total_wait(profile, schedule) == pytest.approx(best)
        # Packing never costs: the least over all contiguous schedules is the same.
        assert best == pytest.approx(min(total_wait(profile, c)
                                         for c in contiguous_schedules(num_units, period)))


@pytest.mark.parametrize("seed", range(4))
def test_bubble_filling_only_adds_units_and_keeps_the_waits(seed):
    rng = random.Random(100 + seed)
    for num_units, period in [(4, 2), (6, 3), (8, 5)]:
        profile = random_profile(rng, num_units)
        unfilled = dreamddp_schedule(profile, period, fill_bubbles=False)
        filled = dreamddp_schedule(profile, period)
        for before, after in zip(unfilled, filled, strict=True):
            assert before <= after
            assert iteration_wait(profile, after) == iteration_wait(profile, before)


def test_mean_iteration_seconds_of_the_three_schedules():
    # HAND: forward 1 + backward 5 = 6 s per iteration before waits.
    # DreamDDP: waits 0 and 1 -> mean 6.5. PLSGD ({0, 1}, {2, 3}): {0, 1} waits 1 (1..4, 4..6),
    # {2, 3} waits 1 (3..4, 5..6) -> 7. Local SGD: all 7 s of communication after the last step,
    # once per 2 iterations -> 6 + 3.5 = 9.5.
    assert mean_iteration_seconds(HAND, dreamddp_schedule(HAND, 2)) == 6.5
    assert mean_iteration_seconds(HAND, plsgd_schedule(4, 2)) == 7.0
    assert full_sync_seconds(HAND, 2) == 9.5
    with pytest.raises(UserError, match="period is 0"):
        full_sync_seconds(HAND, 0)


def test_schedule_report_and_its_table():
    report = schedule_report(HAND, 2)
    assert json.loads(json.dumps(report)) == report
    assert report["units"][0] == {"name": "layer 2", "backward_seconds": 1.0, "comm_seconds": 3.0}
    assert list(report["schedules"]) == ["local_sgd", "plsgd", "dreamddp"]
    assert [s["mean_iteration_seconds"] for s in report["schedules"].values()] == [9.5, 7.0, 6.5]
    assert report["schedules"]["local_sgd"]["iterations"][1] == {
        "units": ["layer 2", "layer 1", "layer 0", "rest"], "comm_seconds": 7.0,
        "wait_seconds": 7.0, "iteration_seconds": 13.0}
    assert report["schedules"]["dreamddp"]["iterations"][0] == {
        "units": ["layer 2", "layer 0"], "comm_seconds": 4.0, "wait_seconds": 0.0,
        "iteration_seconds": 6.0}
    assert report["schedules"]["dreamddp"]["total_wait_seconds"] == 1.0

    lines = format_schedule_report(report).splitlines()
    assert len(lines) == 1 + 1 + 3 * (2 + 1)  # title, header, 2 iterations + mean per schedule
    header = lines[1]
    assert header.split() == ["schedule", "iteration", "units", "comm", "ms", "wait", "ms",
                              "iteration", "ms"]
    assert lines[-1].split() == ["dreamddp", "mean", "500.00", "6500.00"]
    for line in lines[2:]:  # right-aligned numbers end under their headers
        assert len(line) == len(header)


def test_profile_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(HAND, path)
    assert load_profile(path) == HAND
    data = json.loads(path.read_text())
    assert data["units"][3] == {"name": "rest", "backward_seconds": 2.0, "comm_seconds": 1.0}
    del data["forward_seconds"]
    path.write_text(json.dumps(data))
    assert load_profile(path).forward_seconds == 0.0


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not valid JSON"),
    ('{"units": 3}', "needs a 'units' list"),
    ('[]', "needs a 'units' list"),
    ('{"units": [{"name": "a", "backward_seconds": 1}]}', "unit 0 lacks comm_seconds"),
    ('{"units": [{"name": "a", "backward_seconds": -1, "comm_seconds": 1}]}',
     "backward_seconds has -1"),
    ('{"units": [{"name": "a", "backward_seconds": "1", "comm_seconds": 1}]}',
     "backward_seconds has '1'"),
    ('{"units": []}', "has no units"),
])
def test_bad_profiles_are_user_errors(tmp_path, text, problem):
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(UserError, match=problem) as error:
        load_profile(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_profile_file_and_bad_profiles(tmp_path):
    with pytest.raises(UserError, match="cannot read the profile .*missing.json"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(UserError, match="2 names, 1 backward times and 2 comm times"):
        UnitProfile(names=("a", "b"), backward_seconds=(1.0,), comm_seconds=(1.0, 1.0))
    with pytest.raises(UserError, match="forward_seconds has nan"):
        UnitProfile(names=("a",), backward_seconds=(1.0,), comm_seconds=(1.0,),
                    forward_seconds=float("nan"))
    with pytest.raises(UserError, match="period is 0"):
        dreamddp_schedule(HAND, 0)
