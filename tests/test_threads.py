"""Windows shared between threads (docs/guide.md, "Threads"): every public call holds the
window's lock, so concurrent pushes serialize and a query racing with pushes answers for one
window state (some prefix of the serialized pushes), never a mixture."""

import threading

import numpy as np

import rank1inv as r1
from rank1inv import testing


def test_queries_racing_pushes_answer_for_one_state():
    d, cap, n = 40, 4, 60
    pool = testing.gradients("iid", n, d, seed=1, dtype="float64")
    x = np.random.default_rng(2).standard_normal(d)
    # the answer after each prefix of pushes, serially
    ref = r1.DynamicInverse(d, cap, 1e-2, dtype="float64")
    answers = []
    for g in pool:
        ref.push(g)
        answers.append(np.asarray(ref @ x))
    answers = np.stack(answers)
    w = r1.DynamicInverse(d, cap, 1e-2, dtype="float64")
    w.push(pool[0])
    seen, errors = [], []

    def pusher():
        for g in pool[1:]:
            w.push(g)

    def reader():
        try:
            while len(seen) < 400:
                seen.append(np.asarray(w @ x))
        except Exception as err:  # pragma: no cover - a failure is reported below
            errors.append(err)

    threads = [threading.Thread(target=pusher)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for y in seen:  # each answer is the one of some prefix (bit for bit: the same operations)
        gap = np.min(np.max(np.abs(answers - y), axis=1) / np.max(np.abs(answers), axis=1))
        assert gap <= 1e-13, gap


def test_concurrent_pushes_leave_a_consistent_window():
    d, cap = 40, 6
    pool = testing.gradients("iid", 200, d, seed=3, dtype="float64")
    w = r1.DynamicInverse(d, cap, 1e-3, dtype="float64")
    halves = [pool[:100], pool[100:]]
    threads = [threading.Thread(target=lambda h=h: [w.push_apply(g) for g in h]) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(w) == cap and w.state_dict()["counter"] == 200
    w2 = r1.DynamicInverse(d, cap, 1e-3, dtype="float64")
    w2.load_state_dict(w.state_dict())  # its own Gram matrix and factor check out against its gradients
    G = np.asarray(w.gradients())
    F = testing.dense_fisher(G, 1e-3, 1 / cap)
    x = np.random.default_rng(4).standard_normal(d)
    assert testing.backward_error(F, w @ x, x) <= 5e-12
