"""Unit tests for gpu_attach_server.broker.scheduler: pure placement over a snapshot."""

import pytest

from gpu_attach_server.broker.scheduler import GPU, Allocation, NoFit, Placement, free_memory, place
from jupyter_gpu_attach.slices import SliceRequest

GiB = 1024**3


def gpu(agent: str, index: int, mem_gib: float = 80, pool: str = "default") -> GPU:
    return GPU(f"{agent}/{index}", agent, index, "H100", int(mem_gib * GiB), False, pool)


def used(g: GPU, gib: float) -> Allocation:
    return Allocation(g.id, int(gib * GiB))


# -- free memory ----------------------------------------------------------------------------


def test_free_memory_sums_allocations_per_gpu():
    a, b = gpu("a", 0), gpu("a", 1)
    free = free_memory([a, b], [used(a, 10), used(a, 5), Allocation("elsewhere/0", GiB)])
    assert free == {a.id: 65 * GiB, b.id: 80 * GiB}


# -- slices ---------------------------------------------------------------------------------


def test_memory_request_best_fit_picks_smallest_sufficient_hole():
    big, mid, small = gpu("a", 0), gpu("a", 1), gpu("a", 2)
    allocs = [used(big, 10), used(mid, 60), used(small, 75)]  # free: 70, 20, 5
    p = place(SliceRequest(memory=8 * GiB), [big, mid, small], allocs)
    assert isinstance(p, Placement)
    assert p.gpus == (mid,)
    assert p.memory_per_gpu == 8 * GiB
    assert p.fraction_per_gpu == pytest.approx(8 / 80)


def test_best_fit_uses_exact_fit():
    a, b = gpu("a", 0), gpu("a", 1)
    p = place(SliceRequest(memory=20 * GiB), [a, b], [used(a, 10), used(b, 60)])  # free 70, 20
    assert p.gpus == (b,)


def test_best_fit_ignores_order_of_gpus():
    a, b, c = gpu("a", 0), gpu("b", 0), gpu("c", 0)
    allocs = [used(a, 0.5), used(b, 40), used(c, 70)]
    for order in ([a, b, c], [c, b, a], [b, c, a]):
        assert place(SliceRequest(memory=5 * GiB), order, allocs).gpus == (c,)


def test_best_fit_across_gpu_sizes():
    # With nothing allocated, the smaller GPU is the tighter fit.
    big, small = gpu("a", 0, mem_gib=80), gpu("b", 0, mem_gib=24)
    assert place(SliceRequest(memory=16 * GiB), [big, small], []).gpus == (small,)
    # A request the small GPU cannot hold goes to the big one.
    assert place(SliceRequest(memory=30 * GiB), [big, small], []).gpus == (big,)


def test_fraction_is_of_each_gpus_memory():
    g = gpu("a", 0, mem_gib=40)
    p = place(SliceRequest(fraction=0.25), [g], [])
    assert p.gpus == (g,)
    assert p.memory_per_gpu == 10 * GiB
    assert p.fraction_per_gpu == pytest.approx(0.25)


def test_fraction_best_fit_and_busy():
    a, b = gpu("a", 0), gpu("a", 1)
    # a has half free, b has 0.3 free: 0.25 goes to b (tightest).
    p = place(SliceRequest(fraction=0.25), [a, b], [used(a, 40), used(b, 56)])
    assert p.gpus == (b,)
    # 0.5 only fits on a.
    p = place(SliceRequest(fraction=0.5), [a, b], [used(a, 40), used(b, 56)])
    assert p.gpus == (a,)


def test_gpu_is_never_over_committed():
    g = gpu("a", 0, mem_gib=10)
    allocs = []
    for _ in range(3):
        p = place(SliceRequest(fraction=0.3), [g], allocs)
        allocs.append(Allocation(g.id, p.memory_per_gpu))
    assert sum(a.memory for a in allocs) <= g.memory
    with pytest.raises(NoFit) as e:
        place(SliceRequest(fraction=0.3), [g], allocs)
    assert e.value.never is False


def test_affinity_breaks_ties():
    a, b, c = gpu("a", 0), gpu("a", 1), gpu("a", 2)
    req = SliceRequest(memory=4 * GiB)
    # Equal fit everywhere: without a hint the lowest id wins, with a hint the preferred GPU.
    assert place(req, [a, b, c], []).gpus == (a,)
    assert place(req, [a, b, c], [], prefer_gpu_ids=frozenset({c.id})).gpus == (c,)
    assert place(req, [a, b, c], [], prefer_gpu_ids=frozenset({b.id, c.id})).gpus == (b,)


def test_affinity_does_not_override_best_fit():
    a, b = gpu("a", 0), gpu("a", 1)
    allocs = [used(b, 60)]  # b is the tighter fit
    p = place(SliceRequest(memory=4 * GiB), [a, b], allocs, prefer_gpu_ids=frozenset({a.id}))
    assert p.gpus == (b,)


def test_memory_too_large_for_any_gpu_is_never():
    gs = [gpu("a", 0, 24), gpu("b", 0, 80)]
    with pytest.raises(NoFit) as e:
        place(SliceRequest(memory=100 * GiB), gs, [])
    assert e.value.never is True
    msg = str(e.value)
    assert "100 GiB" in msg and "80 GiB" in msg and "b/0" in msg
    assert "--gpus" in msg


def test_memory_busy_is_not_never_and_names_largest_free_slice():
    a, b = gpu("a", 0), gpu("a", 1)
    with pytest.raises(NoFit) as e:
        place(SliceRequest(memory=30 * GiB), [a, b], [used(a, 70), used(b, 56)])  # free 10, 24
    assert e.value.never is False
    msg = str(e.value)
    assert "30 GiB" in msg and "free now" in msg
    assert "24 GiB" in msg and "a/1" in msg


def test_no_gpu_in_pool_is_never_and_lists_pools():
    gs = [gpu("a", 0, pool="a100"), gpu("b", 0, pool="h100")]
    with pytest.raises(NoFit) as e:
        place(SliceRequest(fraction=0.5, pool="v100"), gs, [])
    assert e.value.never is True
    msg = str(e.value)
    assert "'v100'" in msg and "a100" in msg and "h100" in msg


def test_no_gpu_at_all_says_start_an_agent():
    with pytest.raises(NoFit) as e:
        place(SliceRequest(fraction=0.5), [], [])
    assert e.value.never is True
    assert "gpu-attach agent" in str(e.value)


def test_pool_filtering():
    a = gpu("a", 0, pool="a100")
    h = gpu("b", 0, pool="h100")
    allocs = [used(h, 70)]  # h is the tighter fit but wrong pool for a100 requests
    assert place(SliceRequest(memory=GiB, pool="a100"), [a, h], allocs).gpus == (a,)
    assert place(SliceRequest(memory=GiB, pool="h100"), [a, h], allocs).gpus == (h,)
    assert place(SliceRequest(memory=GiB), [a, h], allocs).gpus == (h,)  # no pool: any GPU
    with pytest.raises(NoFit) as e:
        place(SliceRequest(memory=20 * GiB, pool="h100"), [a, h], allocs)
    assert e.value.never is False
    assert "'h100'" in str(e.value)


def test_fraction_need_is_at_least_one_byte():
    g = GPU("t/0", "t", 0, "tiny", 10, True)
    p = place(SliceRequest(fraction=0.01), [g], [])
    assert p.memory_per_gpu == 1


# -- whole GPUs -----------------------------------------------------------------------------


def test_default_request_is_one_whole_idle_gpu():
    a, b = gpu("a", 0), gpu("a", 1)
    p = place(SliceRequest(), [a, b], [used(a, 1)])
    assert p.gpus == (b,)
    assert p.memory_per_gpu == b.memory
    assert p.fraction_per_gpu == 1.0


def test_whole_gpus_come_from_one_agent():
    gs = [gpu("a", 0), gpu("b", 0), gpu("b", 1)]
    p = place(SliceRequest(gpus=2), gs, [])
    assert {g.agent_id for g in p.gpus} == {"b"}
    assert [g.index for g in p.gpus] == [0, 1]


def test_whole_gpus_pick_the_agent_with_fewest_idle_that_fits():
    gs = [gpu("a", i) for i in range(4)] + [gpu("b", i) for i in range(2)] + [gpu("c", i) for i in range(3)]
    p = place(SliceRequest(gpus=2), gs, [])
    assert {g.agent_id for g in p.gpus} == {"b"}
    # With one of b's GPUs partly used, b no longer fits two; c (3 idle) beats a (4 idle).
    p = place(SliceRequest(gpus=2), gs, [Allocation("b/1", 1)])
    assert {g.agent_id for g in p.gpus} == {"c"}


def test_whole_gpu_only_takes_idle_gpus():
    gs = [gpu("a", i) for i in range(3)]
    p = place(SliceRequest(gpus=2), gs, [used(gs[0], 1)])
    assert [g.id for g in p.gpus] == ["a/1", "a/2"]


def test_whole_gpu_affinity_prefers_session_gpus():
    gs = [gpu("a", i) for i in range(4)]
    p = place(SliceRequest(gpus=1), gs, [], prefer_gpu_ids=frozenset({"a/2"}))
    assert p.gpus == (gs[2],)
    p = place(SliceRequest(gpus=2), gs, [], prefer_gpu_ids=frozenset({"a/3"}))
    assert [g.id for g in p.gpus] == ["a/0", "a/3"]  # the preferred one plus the lowest index


def test_whole_gpus_more_than_any_host_has_is_never():
    gs = [gpu("a", 0), gpu("a", 1), gpu("b", 0)]
    with pytest.raises(NoFit) as e:
        place(SliceRequest(gpus=3), gs, [])
    assert e.value.never is True
    assert "3 GPUs" in str(e.value) and "most on one host: 2" in str(e.value)


def test_whole_gpus_busy_is_not_never():
    gs = [gpu("a", 0), gpu("a", 1), gpu("b", 0)]
    with pytest.raises(NoFit) as e:
        place(SliceRequest(gpus=2), gs, [used(gs[1], 1)])
    assert e.value.never is False
    assert "2 idle GPUs" in str(e.value) and "most idle on one host: 1" in str(e.value)


def test_whole_gpu_busy_singular_message():
    g = gpu("a", 0)
    with pytest.raises(NoFit) as e:
        place(SliceRequest(gpus=1), [g], [used(g, 1)])
    assert e.value.never is False
    assert "1 idle GPU now" in str(e.value)


def test_whole_gpus_respect_pool():
    gs = [gpu("a", 0, pool="x"), gpu("a", 1, pool="y"), gpu("b", 0, pool="x"), gpu("b", 1, pool="x")]
    p = place(SliceRequest(gpus=2, pool="x"), gs, [])
    assert [g.id for g in p.gpus] == ["b/0", "b/1"]
    with pytest.raises(NoFit) as e:
        place(SliceRequest(gpus=3, pool="x"), gs, [])
    assert e.value.never is True


# -- MIG -----------------------------------------------------------------------------------------


def mig_host(agent="h1", layout=("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")):
    return [GPU(f"{agent}/{i}", agent, i, f"H100 MIG {p}", int(p.split(".")[1][:-2]) * GiB, False, mig=p)
            for i, p in enumerate(layout)]


def test_a_mig_request_gets_a_whole_instance_of_its_profile():
    gpus = mig_host()
    p = place(SliceRequest(mig="1g.10gb"), gpus, [])
    assert p.gpus[0].id == "h1/2" and p.memory_per_gpu == 10 * GiB
    assert p.fraction_per_gpu == pytest.approx(1 / 7)  # its share of the physical GPU
    p = place(SliceRequest(mig="1g.10gb"), gpus, [Allocation("h1/2", 10 * GiB)])
    assert p.gpus[0].id == "h1/3"
    p = place(SliceRequest(mig="1g.10gb"), gpus, [], prefer_gpu_ids=frozenset({"h1/3"}))
    assert p.gpus[0].id == "h1/3"  # the session's last instance, where its sandbox is
    assert place(SliceRequest(mig="3g.40gb"), gpus, []).fraction_per_gpu == pytest.approx(3 / 7)


def test_mig_instances_in_use_or_missing_are_told_apart():
    gpus = mig_host()
    with pytest.raises(NoFit) as e:
        place(SliceRequest(mig="1g.10gb"), gpus, [Allocation("h1/2", 1), Allocation("h1/3", 10 * GiB)])
    assert not e.value.never and "every MIG 1g.10gb instance is in use now (2 in all)" in str(e.value)
    with pytest.raises(NoFit) as e:
        place(SliceRequest(mig="7g.80gb"), gpus, [])
    assert e.value.never and "MIG profiles up: 1g.10gb, 2g.20gb, 3g.40gb" in str(e.value)
    with pytest.raises(NoFit) as e:
        place(SliceRequest(mig="1g.10gb"), [GPU("h2/0", "h2", 0, "A100", 80 * GiB, False)], [])
    assert e.value.never and "no GPU is in MIG mode" in str(e.value)


def test_other_requests_never_land_on_mig_instances():
    plain = GPU("h2/0", "h2", 0, "A100", 80 * GiB, False)
    for request in (SliceRequest(fraction=0.1), SliceRequest(memory=5 * GiB), SliceRequest(gpus=1), SliceRequest()):
        assert place(request, mig_host() + [plain], []).gpus[0].id == "h2/0"
        with pytest.raises(NoFit) as e:
            place(request, mig_host(), [])
        assert e.value.never and "in MIG mode: ask for one of its instances with --mig" in str(e.value)


def test_mig_profiles_are_checked_where_they_are_asked_for():
    assert SliceRequest.from_options(mig=" 1G.10GB ").mig == "1g.10gb"
    for bad in ("1g", "10gb", "9g.10gb", "1g.10gb;rm"):
        with pytest.raises(ValueError, match="MIG profile"):
            SliceRequest(mig=bad)
    with pytest.raises(ValueError, match="not --gpus and --mig"):
        SliceRequest(gpus=1, mig="1g.10gb")
    assert SliceRequest(mig="2g.20gb").describe() == "a MIG 2g.20gb instance"
    assert SliceRequest(mig="2g.20gb").to_json() == {"mig": "2g.20gb"}
