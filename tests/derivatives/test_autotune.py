"""strategy="auto": cache, keys, random functions, threads, the scoped switch, the margin rule."""

from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch
from torch import nn

import gradlab as gl
from gradlab._derivatives import HESSIAN, JACOBIAN, OPERATIONS, _autotune
from gradlab._derivatives._keys import function_key


@pytest.fixture(autouse=True)
def _fresh_cache():
    gl.clear_autotune_cache()
    yield
    gl.clear_autotune_cache()


def _until_decided(call, limit=200):
    """Call until no key is on trial (the first call, then the trials' calls, if any)."""
    call()
    for _ in range(limit):
        if not any(e.trial is not None for e in list(_autotune._CACHE.values())):
            return
        call()
    raise AssertionError(f"still on trial after {limit} calls")


def test_auto_measures_once_and_caches():
    x = torch.randn(6)
    W = torch.randn(4, 6)

    def f(z):
        return torch.tanh(W @ z)

    def settle(g):  # the first call, then the calls of the trials if any started
        _until_decided(
            lambda: torch.testing.assert_close(gl.jacobian(g, x), torch.func.jacrev(g)(x))
        )

    with gl.autotune(True):
        settle(f)
        choices = gl.autotune_choices()
        assert len(choices) == 1
        (chosen,) = choices.values()
        assert chosen in JACOBIAN.names
        gl.jacobian(f, torch.randn(6))  # same signature: no new measurement
        settle(lambda z: torch.tanh(W @ z))  # other code: a new key
        assert len(gl.autotune_choices()) == 2
    with gl.autotune(False):
        assert not gl.is_autotune_enabled()
        gl.jacobian(f, torch.randn(7)[:6])
        gl.hessian(lambda z: z.pow(3).sum(), x)
    assert len(gl.autotune_choices()) == 2
    gl.clear_autotune_cache()
    assert gl.autotune_choices() == {}


class _Counter:
    def __init__(self):
        self.n = 0


def test_cache_hit_runs_only_the_chosen_strategy():
    W = torch.randn(4, 6)
    calls = _Counter()

    def f(z):
        calls.n += 1
        return torch.tanh(W @ z)

    with gl.autotune(True):
        gl.jacobian(f, torch.randn(6))  # cache miss: one call, then the measurement
        measured = calls.n
        _until_decided(lambda: gl.jacobian(f, torch.randn(6)))  # the trials, if any
        (chosen,) = gl.autotune_choices().values()
        calls.n = 0
        gl.jacobian(f, torch.randn(6), strategy=chosen)
        explicit = calls.n
        calls.n = 0
        gl.jacobian(f, torch.randn(6))  # cache hit
    assert calls.n == explicit < measured


def test_random_function_is_not_measured_and_draws_as_one_call():
    x = torch.randn(5)
    calls = _Counter()

    def noisy(z):
        calls.n += 1
        return torch.sin(z * torch.rand(5)).sum()

    torch.manual_seed(7)
    ref = gl.hessian(noisy, x, strategy=HESSIAN.heuristic(None, None))
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    calls.n = 0
    with gl.autotune(True):
        got = gl.hessian(noisy, x)
    after_got = torch.rand(3)
    assert calls.n == 1 and gl.autotune_choices() == {}
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(after_got, after_ref)


def _rev_hessian(f):
    # reference without forward mode: torch.func.hessian (jacfwd) itself fails from threads
    return torch.func.jacrev(torch.func.grad(f))


def test_threads_fresh_functions_no_errors_right_values():
    """4 threads x 12 calls of hessian / hvp / jacobian with auto, each on a new key."""
    W = torch.randn(3, 6, dtype=torch.float64)
    errors, checked = [], []

    def work(t):
        for i in range(12):
            n = 2 + (t * 12 + i) % 5  # fresh signatures across calls and threads
            c = float(t * 100 + i)  # closed-over constant: a fresh key every call
            x = torch.randn(n, dtype=torch.float64)
            Wn = W[:, :n]

            def f(z, c=c, Wn=Wn):
                return (torch.tanh(Wn @ z) ** 2).sum() * (1 + c / 1000) + z.pow(3).sum()

            try:
                kind = i % 3
                if kind == 0:
                    got = gl.hessian(f, x)
                    torch.testing.assert_close(got, _rev_hessian(f)(x))
                elif kind == 1:
                    v = torch.randn_like(x)
                    got = gl.hvp(f, x, v).hvp
                    torch.testing.assert_close(got, _rev_hessian(f)(x) @ v)
                else:
                    g = lambda z, Wn=Wn, c=c: torch.sin(Wn @ z) * c
                    torch.testing.assert_close(gl.jacobian(g, x), torch.func.jacrev(g)(x))
                checked.append(1)
            except Exception as exc:  # collected, asserted below
                errors.append(repr(exc))

    with gl.autotune(True):  # the threads inherit the process-wide setting, not this scope
        previous = gl.set_autotune(True)
        try:
            threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            gl.set_autotune(previous)
    assert errors == [] and len(checked) == 48


def test_explicit_forward_strategies_from_threads():
    """torch's forward-mode AD state is process-global: gradlab serialises its own use of it."""
    errors = []

    def work():
        x = torch.randn(6, dtype=torch.float64)
        for _ in range(8):
            try:
                gl.hessian(lambda z: (z.sin() ** 2).sum(), x, strategy="fwd-rev")
                gl.jvp(torch.sin, x, x)
                gl.derivative(torch.tanh, x, order=2, strategy="forward")
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def test_random_stream_of_another_thread_is_never_rewound():
    """A thread drawing numbers while others measure gets exactly the seeded stream."""
    draws = 400
    torch.manual_seed(123)
    expected = torch.rand(draws, 64, dtype=torch.float64)
    torch.manual_seed(123)
    seen = []
    measuring = threading.Event()
    previous = gl.set_autotune(True)

    def drawer():
        measuring.wait(10)
        for _ in range(draws):
            seen.append(torch.rand(64, dtype=torch.float64))

    def measurer(t):
        measuring.set()
        for i in range(10):
            x = torch.ones(3 + t, dtype=torch.float64) * (i + 1)  # no RNG use here

            def f(z, i=i):
                return (z.sin() * (i + 1)).sum()

            gl.hessian(f, x)
            gl.hvp(f, x, x)

    try:
        threads = [threading.Thread(target=drawer)]
        threads += [threading.Thread(target=measurer, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        gl.set_autotune(previous)
    torch.testing.assert_close(torch.stack(seen), expected, rtol=0, atol=0)


def test_autotune_scope_is_per_thread():
    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def other():
        inside.wait(10)
        seen["other"] = gl.is_autotune_enabled()
        checked.set()

    previous = gl.set_autotune(True)
    try:
        th = threading.Thread(target=other)
        th.start()
        with gl.autotune(False):
            inside.set()
            checked.wait(10)
            seen["here"] = gl.is_autotune_enabled()
        th.join()
        seen["after"] = gl.is_autotune_enabled()
        assert gl.set_autotune(False) is True  # the process-wide setter is explicit
        with gl.autotune(True):
            seen["scoped_on"] = gl.is_autotune_enabled()
        seen["global_off"] = gl.is_autotune_enabled()
    finally:
        gl.set_autotune(previous)
    assert seen == {
        "other": True,
        "here": False,
        "after": True,
        "scoped_on": True,
        "global_off": False,
    }


def _recursive_closure():
    def power(z, k):
        return z if k == 0 else z * power(z, k - 1)

    return lambda z: power(z, 3).sum()


class _Model:
    def __init__(self, scale):
        self.scale = scale

    def loss(self, z):
        return (z.sin() * self.scale).sum()


def test_keys_recursive_partial_method_module_and_reused_ids():
    x = torch.randn(4, dtype=torch.float64)
    with gl.autotune(True):
        f = _recursive_closure()
        torch.testing.assert_close(gl.hessian(f, x), torch.diag(12 * x**2))
        assert function_key(_recursive_closure()) == function_key(f)  # same code, same key
        n = len(gl.autotune_choices())
        gl.hessian(_recursive_closure(), x)
        assert len(gl.autotune_choices()) == n  # a hit, no RecursionError

        def scaled(z, w):
            return (z.sin() * w).sum()

        p1 = functools.partial(scaled, w=torch.ones(4, dtype=torch.float64))
        p2 = functools.partial(scaled, w=torch.ones(4, dtype=torch.float64))
        p3 = functools.partial(scaled, w=torch.ones(1, dtype=torch.float64))
        assert function_key(p1) == function_key(p2) != function_key(p3)

        a, b = _Model(1.0), _Model(2.0)
        assert function_key(a.loss) == function_key(a.loss)  # a new bound-method object each time
        assert function_key(a.loss) != function_key(b.loss)
        torch.testing.assert_close(gl.hessian(a.loss, x), torch.diag(-x.sin()))

        m1 = nn.Linear(4, 1).double()
        k1 = function_key(m1)
        assert k1 == function_key(m1) and k1 != function_key(nn.Linear(4, 1).double())
        assert function_key(torch.sin) == function_key(torch.sin)  # no __code__, no weakref

    # re-used ids: a key of a dead object never equals the key of a new one
    keys, ids = [], set()
    for _ in range(20):
        m = nn.Identity()  # freed by reference counting at the next assignment
        keys.append(function_key(m))
        ids.add(id(m))
        del m
    assert len(ids) < 20  # CPython re-used addresses, so the check below means something
    assert all(k != function_key(nn.Identity()) for k in keys)
    assert len(set(keys)) == 20


def test_function_key_is_remembered_per_function_and_follows_rebinding():
    from gradlab._derivatives import _keys

    w = torch.ones(3)

    def f(z):
        return (z * w).sum()

    k = function_key(f)
    assert function_key(f) is k  # remembered: the same object back, no closure walk
    w = torch.ones(4)  # the cell now holds another object: a new key
    k2 = function_key(f)
    assert k2 != k and function_key(f) is k2
    assert id(f) in _keys._MEMO
    ident = id(f)
    del f
    assert ident not in _keys._MEMO  # forgotten when the function dies


def test_mutated_closure_stops_being_measured():
    calls = 0

    def f(z):
        nonlocal calls
        calls += 1  # rebinds the closed-over int: the key changes on every call
        return (z.sin() ** 2).sum()

    x = torch.randn(3)
    with gl.autotune(True):
        keys = set()
        for _ in range(_autotune._MAX_MEASURED + 5):
            before = calls
            keys.add(function_key(f))
            gl.hessian(f, x)
        assert len(keys) == _autotune._MAX_MEASURED + 5  # a new key every time
        assert calls - before == 1  # past the limit: one call, no measurement


class _FakeClock:
    """A clock that moves only when a fake strategy "runs" (deterministic timings)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _FakeProblem:
    keep = None

    def __init__(self, f):
        self.f = f

    def key(self):
        return ()

    def devices(self):
        return []


_ROW = 0.125  # fake times are multiples of 1/8: exact in floating point


def _fake_op(costs, ran, loops=()):
    """An operation whose strategies cost ``costs[name]`` fake seconds; those in ``loops`` run
    in rows of ``_ROW`` seconds, checking the deadline before each (as "loop" strategies do)."""
    from gradlab._derivatives import _registry

    clock = _FakeClock()

    def strategy(name):
        def run(p):
            ran.append(name)
            if name in loops:
                for _ in range(int(costs[name] / _ROW)):
                    _registry.check_deadline()
                    clock.now += _ROW
            else:
                clock.now += costs[name]
            return name

        return run

    op = _registry.Operation(
        name="fake",
        strategies={n: strategy(n) for n in costs},
        first="h",
        heuristic=lambda p, r: "h",
        steps=frozenset(loops),
    )
    return op, clock


@pytest.mark.parametrize(
    ("costs", "loops", "timed", "spent", "trial"),
    [
        # "c" is vectorised: never run in the first call, tried on the next ones; "slow" is a
        # loop, abandoned at the first row that cannot beat the heuristic's 1.0 by MARGIN
        ({"h": 1.0, "c": 1.25, "slow": 50.0}, ("slow",), ["slow"], 1.0, "c"),
        # only vectorised candidates: the first call runs nothing else
        ({"h": 1.0, "c": 0.9375, "d": 1.125}, (), [], 0.0, "c"),
        # a loop that beats the heuristic clearly goes to a trial
        ({"h": 2.0, "slow": 1.0}, ("slow",), ["slow"], 1.0, "slow"),
        # a loop abandoned and nothing else: the heuristic is the choice at once
        ({"h": 1.0, "slow": 40.0}, ("slow",), ["slow"], 1.0, None),
    ],
)
def test_first_call_measurement_is_bounded(monkeypatch, costs, loops, timed, spent, trial):
    """The first call runs the heuristic and times only the candidates that stop midway, each
    once, abandoned as soon as they cannot win: it spends at most T / MARGIN plus one row."""
    from gradlab._derivatives import _registry

    ran = []
    op, clock = _fake_op(costs, ran, loops)
    monkeypatch.setattr(_registry, "clock", clock)
    with gl.autotune(True):
        assert _autotune.run_auto(op, _FakeProblem(lambda: None)) == "h"
    assert ran == ["h", *timed]  # one run each: nothing is timed twice
    assert clock.now - costs["h"] == pytest.approx(spent)
    assert clock.now - costs["h"] <= costs["h"] / _autotune.MARGIN + _ROW
    assert clock.now - costs["h"] <= _autotune._BUDGET * costs["h"] + _ROW
    (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake"]
    if trial is None:
        assert (entry.choice, entry.trial) == ("h", None), entry.note
    else:
        assert entry.choice is None and entry.trial.challenger == trial, entry.note


@pytest.mark.parametrize(
    ("trial_costs", "calls", "expected"),
    [
        ((2.0, 1.0), 2 * _autotune._TRIAL_PAIRS, "c"),  # a clear winner: 9 pairs
        ((1.0, 1.05), 2 * _autotune._TRIAL_PAIRS, "h"),  # within the margin: 9 pairs, kept
        ((1.0, 2.0), 2, "h"),  # clearly slower: the trial ends after its first pair
    ],
)
def test_trial_runs_each_call_once_and_decides_by_the_median_ratio(
    monkeypatch, trial_costs, calls, expected
):
    """A vectorised candidate is tried on the calls after the first, which alternate the two
    strategies (one run per call, its result returned) and the median pair ratio decides; a
    clearly slower challenger is dropped after one pair."""
    from gradlab._derivatives import _registry

    ran = []
    op, clock = _fake_op({"h": 2.0, "c": 1.0}, ran)
    monkeypatch.setattr(_registry, "clock", clock)
    problem = _FakeProblem(lambda: None)
    with gl.autotune(True):
        _autotune.run_auto(op, problem)
        assert ran == ["h"]
        costs = dict(zip("hc", trial_costs))
        for name in "hc":
            monkeypatch.setitem(
                op.strategies, name, lambda p, n=name: ran.append(n) or _advance(clock, costs[n])
            )
        ran.clear()
        for _ in range(calls):
            assert _autotune.run_auto(op, problem) == "result"
        assert len(ran) == calls  # one strategy per call
        assert ran[:4] == ["h", "c", "c", "h"][:calls]  # pairs in alternating order
        (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake"]
        assert entry.trial is None and entry.choice == expected, entry.note
        ran.clear()
        _autotune.run_auto(op, problem)
        assert ran == [expected]


def test_trials_follow_one_another_against_the_winner(monkeypatch):
    """Two vectorised candidates: "c" (slower) is dropped after a pair, then "d" (faster) is tried
    against the heuristic and replaces it."""
    from gradlab._derivatives import _registry

    ran = []
    op, clock = _fake_op({"h": 2.0, "c": 3.0, "d": 1.0}, ran)
    monkeypatch.setattr(_registry, "clock", clock)
    problem = _FakeProblem(lambda: None)
    with gl.autotune(True):
        for _ in range(1 + 2 + 2 * _autotune._TRIAL_PAIRS):
            _autotune.run_auto(op, problem)
    assert ran[:3] == ["h", "h", "c"]
    assert ran[3:].count("d") == _autotune._TRIAL_PAIRS and "c" not in ran[3:]
    (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake"]
    assert (entry.trial, entry.choice) == (None, "d"), entry.note


def _advance(clock, seconds):
    clock.now += seconds
    return "result"


def test_a_real_loop_candidate_is_abandoned(monkeypatch):
    """gl.hessian's "loop" strategy (300 autograd.grad rows) stops at its deadline: with a clock
    that advances one unit per reading it starts (a budget large enough to reach it), is
    abandoned before it finishes, and the result (from the heuristic) is still right."""
    from gradlab._derivatives import _registry

    ticks = iter(range(10**6))
    monkeypatch.setattr(_registry, "clock", lambda: float(next(ticks)))
    monkeypatch.setattr(_autotune, "_BUDGET", 1e6)
    monkeypatch.setattr(_autotune, "_MIN_SLOT", 0.0)
    seen = []
    loop = HESSIAN.strategies["loop"]

    def watched(p):
        seen.append("start")
        out = loop(p)
        seen.append("finished")
        return out

    monkeypatch.setitem(HESSIAN.strategies, "loop", watched)
    x = torch.randn(300, dtype=torch.float64)

    def f(z):
        return (z.sin() ** 2).sum()

    with gl.autotune(True):
        H = gl.hessian(f, x)
    torch.testing.assert_close(H, torch.diag(2 * torch.cos(2 * x)))
    assert seen == ["start"]  # started, abandoned before its end


def test_nested_reverse_stops_before_an_order_that_cannot_end_in_time(monkeypatch):
    """gl.derivative's nested "reverse", timed in a first call, stops before an order once the
    orders left, none cheaper than the last, cannot end before its deadline: with orders that
    cost 1, 2, 4, ... against a heuristic of 10 (deadline 10 / MARGIN), it runs two orders
    (3 spent; 2 + 4 x 2 more cannot fit) instead of four (15 spent, past the deadline), and the
    result (the heuristic's) is the 6th derivative of tanh."""
    from gradlab._derivatives import _registry
    from gradlab._derivatives._derivative import DERIVATIVE

    x = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)
    expected = x.detach().requires_grad_(True)
    y = torch.tanh(expected)
    for _ in range(6):  # the reference: nested autograd.grad, written out
        (y,) = torch.autograd.grad(y.sum(), expected, create_graph=True)
    expected = y.detach()

    clock = _FakeClock()
    monkeypatch.setattr(_registry, "clock", clock)
    taylor = DERIVATIVE.strategies["taylor"]

    def heuristic(p):
        clock.now += 10.0
        return taylor(p)

    monkeypatch.setitem(DERIVATIVE.strategies, "taylor", heuristic)
    orders = []
    real_grad = torch.autograd.grad

    def grad(*args, **kwargs):
        clock.now += 2.0 ** len(orders)  # order k costs 2^k units: none cheaper than the last
        orders.append(clock.now)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    with gl.autotune(True):
        d = gl.derivative(torch.tanh, x, order=6)
    torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-10)
    assert orders == [11.0, 13.0]  # two orders timed, then abandoned
    assert clock.now - 10.0 <= 10.0 / _autotune.MARGIN


def test_a_call_too_short_to_measure_runs_no_candidate(monkeypatch):
    """A first run shorter than _MIN_SLOT / _BUDGET leaves no slot to start (and abandon) a
    candidate in: nothing but the call itself runs, and the heuristic is kept."""
    from gradlab._derivatives import _registry

    ran = []
    short = _autotune._MIN_SLOT / _autotune._BUDGET / 2
    op, clock = _fake_op({"h": short, "c": short / 4}, ran, loops=("c",))
    monkeypatch.setattr(_registry, "clock", clock)
    with gl.autotune(True):
        _autotune.run_auto(op, _FakeProblem(lambda: None))
    assert ran == ["h"]
    (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake"]
    assert entry.choice == "h", entry.note


def test_autotune_switch_errors():
    with pytest.raises(
        TypeError, match=r"set_autotune: enabled must be True or False, got 'no'\. Pass a bool"
    ):
        gl.set_autotune("no")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"autotune: enabled must be True or False, got 0\. Pass a bool"
    ):
        with gl.autotune(0):  # type: ignore[arg-type]
            pass


def test_threads_same_function_default_strategy():
    """The issue's case: 4 threads x 10 calls of gl.hessian with the default strategy, one key."""
    W = torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64)

    def f(z):
        return (torch.tanh(W @ z) ** 2).sum() + z.pow(3).sum()

    expected = _rev_hessian(f)(x)
    errors, results = [], []
    start = threading.Barrier(4)

    def work():
        start.wait()
        for _ in range(10):
            try:
                results.append(gl.hessian(f, x))
            except Exception as exc:
                errors.append(repr(exc))

    previous = gl.set_autotune(True)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        gl.set_autotune(previous)
    assert errors == [] and len(results) == 40
    for h in results:
        torch.testing.assert_close(h, expected)
    with gl.autotune(True):  # the calls of the trials, if the measurement started any
        _until_decided(lambda: torch.testing.assert_close(gl.hessian(f, x), expected))
    assert len(gl.autotune_choices()) == 1  # one choice for the one key


def test_signature_of_plain_containers_and_of_other_pytrees():
    from collections import namedtuple

    from gradlab._derivatives._keys import signature

    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    assert signature({"w": a, "b": [a]}) == signature({"w": b, "b": [b]})  # values do not count
    different = [
        {"w": torch.zeros(3, 2), "b": [a]},  # shape
        {"w": a.double(), "b": [a]},  # dtype
        {"w": a.clone().requires_grad_(), "b": [a]},  # requires_grad
        {"w": a, "b": (a,)},  # container type
        {"v": a, "b": [a]},  # key
    ]
    keys = {signature({"w": a, "b": [a]}), *(signature(t) for t in different)}
    assert len(keys) == len(different) + 1
    pair = namedtuple("pair", "x y")
    assert signature(pair(a, a)) != signature((a, a))  # through pytree: the spec names the type
    assert signature((a, 2)) != signature((a, 3))  # a Python scalar argument's value counts
    hash(signature((pair(a, 1.5), {"k": [a, None]})))  # always hashable


N_CALLS = 1000


def test_auto_never_breaks_another_threads_forward_mode():
    """A user thread loops ``torch.func.jvp`` while this thread makes 1000 ``"auto"`` calls,
    measuring (the cache is cleared every 4 calls) on operations whose strategies include
    forward mode (and, for a tall Jacobian, whose heuristic is forward mode): no call of the
    user's fails, and every result is right (forward-AD levels are process-global in torch)."""
    x = torch.randn(3, dtype=torch.float64)
    v = torch.ones(3, dtype=torch.float64)
    stop = threading.Event()
    user = {"calls": 0, "errors": []}

    def user_thread():
        while not stop.is_set():
            try:
                _, tangent = torch.func.jvp(torch.sin, (x,), (v,))
                torch.testing.assert_close(tangent, torch.cos(x), rtol=0, atol=0)
            except Exception as exc:  # the failure this test is about
                user["errors"].append(repr(exc))
            user["calls"] += 1

    W = torch.randn(8, 2, dtype=torch.float64)
    z = torch.randn(2, dtype=torch.float64)
    ws = torch.randn(4, dtype=torch.float64)

    def tall(a):  # 2 -> 8: jacobian's heuristic is "forward"
        return torch.tanh(W @ a)

    def loss(a):
        return (torch.sin(a) * a).sum()

    def cube(a):
        return a**3

    jac_ref = torch.func.jacrev(tall)(z)
    hess_ref = torch.func.jacrev(torch.func.grad(loss))(ws)
    calls = [
        lambda: torch.testing.assert_close(gl.jacobian(tall, z), jac_ref),
        lambda: torch.testing.assert_close(gl.hessian(loss, ws), hess_ref),
        lambda: torch.testing.assert_close(gl.hvp(loss, ws, ws).hvp, hess_ref @ ws),
        lambda: torch.testing.assert_close(gl.derivative(cube, ws, order=2), 6 * ws),
    ]
    thread = threading.Thread(target=user_thread)
    previous = gl.set_autotune(True)
    thread.start()
    try:
        for i in range(N_CALLS):
            if i % 4 == 0:
                gl.clear_autotune_cache()
            calls[i % 4]()
    finally:
        stop.set()
        thread.join()
        gl.set_autotune(previous)
    assert user["calls"] > 0
    assert user["errors"] == [], f"{len(user['errors'])} of {user['calls']}: {user['errors'][0]}"


def test_auto_uses_forward_mode_when_its_thread_is_alone(monkeypatch):
    """The rule costs nothing single-threaded: a tall Jacobian runs "forward" under "auto" when
    no other Python thread is alive, and its reverse-mode fallback while one is."""
    ran = []
    strategies = JACOBIAN.strategies
    for name in ("forward", "reverse"):
        monkeypatch.setitem(
            strategies, name, lambda p, impl=strategies[name], n=name: ran.append(n) or impl(p)
        )
    W = torch.randn(8, 2)

    def tall(a):
        return W @ a

    z = torch.randn(2)
    with gl.autotune(False):
        gl.jacobian(tall, z)  # the first call runs "reverse" to learn the output size
        ran.clear()
        alone = threading.active_count() == 1
        torch.testing.assert_close(gl.jacobian(tall, z), W)
        if alone:
            assert ran == ["forward"]
        ran.clear()
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        try:
            torch.testing.assert_close(gl.jacobian(tall, z), W)
        finally:
            stop.set()
            other.join()
        assert ran == ["reverse"]


@pytest.mark.parametrize("op", ["jacobian", "hessian", "hvp", "derivative"])
def test_measuring_leaves_grad_mode_and_forward_ad_as_they_were(op, monkeypatch):
    """The "auto" calls that measure (the first call, abandoned loops included, and the trials of
    the other candidates, forward mode included) under torch.no_grad(): grad mode stays off, no
    forward-AD level is left entered, and the functorch interpreter stack is empty afterwards."""
    from gradlab._derivatives import _registry

    monkeypatch.setattr(_autotune, "_MIN_SLOT", 0.0)  # measure however short the call
    ran = set()
    real = _registry.Operation.run

    def run(self, strategy, problem, fkey=None):
        ran.add(strategy)
        return real(self, strategy, problem, fkey)

    monkeypatch.setattr(_registry.Operation, "run", run)
    W = torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def scalar(z):
        return torch.tanh(W @ z).pow(2).sum()

    calls = {
        "jacobian": lambda: gl.jacobian(lambda z: torch.tanh(W @ z), x),
        "hessian": lambda: gl.hessian(scalar, x),
        "hvp": lambda: gl.hvp(scalar, x, torch.ones(5, dtype=torch.float64)),
        "derivative": lambda: gl.derivative(torch.tanh, x, order=2),
    }
    with gl.autotune(True), torch.no_grad():
        for _ in range(1 + 2 * _autotune._TRIAL_PAIRS * 3):
            calls[op]()
            assert not torch.is_grad_enabled()
    assert ran == set(OPERATIONS[op].names)  # every strategy ran
    assert torch.is_grad_enabled()
    assert torch._C._functorch.peek_interpreter_stack() is None
    _, tangent = torch.func.jvp(torch.sin, (x.detach(),), (torch.ones(5, dtype=torch.float64),))
    torch.testing.assert_close(tangent, torch.cos(x.detach()))  # no level left entered


def test_a_probed_forward_mode_run_is_not_timed(monkeypatch):
    """A forward-mode challenger's first run carries the grad-mode probe (a TorchFunctionMode,
    several times slower): the trial runs it untimed and times the next one, so the probe does
    not decide against it."""
    from torch.overrides import _get_current_function_mode_stack

    from gradlab._derivatives import _registry

    clock = _FakeClock()
    ran = []

    def strategy(name, cost):
        def run(p):
            probed = bool(_get_current_function_mode_stack())
            ran.append((name, probed))
            clock.now += cost + (10.0 if probed else 0.0)
            return name

        return run

    op = _registry.Operation(
        name="fake-forward",
        strategies={"h": strategy("h", 2.0), "c": strategy("c", 1.0)},
        first="h",
        heuristic=lambda p, r: "h",
        fallback={"c": "h"},
        forward_ad=frozenset({"c"}),
    )
    monkeypatch.setattr(_registry, "clock", clock)
    problem = _FakeProblem(lambda: None)
    with gl.autotune(True):
        _until_decided(lambda: _autotune.run_auto(op, problem))
    assert ran[:4] == [("h", False), ("h", False), ("c", True), ("c", False)]
    assert [n for n, probed in ran if probed] == ["c"]  # probed once, never timed
    (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake-forward"]
    assert entry.choice == "c", entry.note


def test_a_first_run_of_another_strategy_times_nothing(monkeypatch):
    """jacobian's case: the first call runs a strategy ("r") that turns out not to be the
    heuristic ("h"); there is no heuristic time to beat, so no loop is timed, and "r" (already
    run once) is tried against "h" on the next calls."""
    from gradlab._derivatives import _registry

    ran = []
    op, clock = _fake_op({"h": 1.0, "r": 1.5, "loop": 0.5}, ran, loops=("loop",))
    op = dataclasses.replace(op, first="r")
    monkeypatch.setattr(_registry, "clock", clock)
    with gl.autotune(True):
        _autotune.run_auto(op, _FakeProblem(lambda: None))
    assert ran == ["r"]
    (entry,) = [e for k, e in _autotune._CACHE.items() if k[0] == "fake"]
    assert entry.trial is not None and (entry.trial.baseline, entry.trial.challenger) == ("h", "r")


def test_cached_memo_never_outlives_a_write_to_the_cache():
    """cached() answers a repeated key from its memo without hashing: every write to the cache
    (a store, the end of a trial, a clear) must make that memo stale, so it always agrees with
    a plain look-up."""
    f = lambda x: (x**3).sum()
    x = torch.ones(3)
    with gl.autotune(False):
        gl.hvp(f, x, x)
    (key,) = [k for k in _autotune._CACHE if k[0] == "hvp"]
    first = _autotune.cached(key)
    assert first is _autotune._CACHE[key] and _autotune.cached(key) is first  # memo hit
    assert _autotune.cached(("hvp", "another key")) is None
    assert _autotune.cached(key) is first
    replaced = _autotune._Entry(first.heuristic, "rev-rev", "test")
    _autotune._store(key, replaced)
    assert _autotune.cached(key) is replaced
    trial = _autotune._Trial("double-backward", "rev-rev")
    on_trial = _autotune._Entry(first.heuristic, None, "test", trial)
    _autotune._store(key, on_trial)
    assert _autotune.cached(key) is on_trial
    done = _autotune._Entry(first.heuristic, "double-backward", "test")
    _autotune._finish(key, on_trial, done)
    assert _autotune.cached(key) is done
    gl.clear_autotune_cache()
    assert _autotune.cached(key) is None
    stamp = _autotune._VERSION
    _autotune._LAST = (stamp - 1, key, done)  # a memo made before a write: never used
    assert _autotune.cached(key) is None
