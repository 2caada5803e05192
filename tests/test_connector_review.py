"""Adversarial review of the vLLM connector: each test here once failed against the code it
names. The two sides run in this process over small fake KV tensors (the harness of
test_connector_sides); vLLM's side of each contract is quoted where it matters."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from test_connector_sides import (  # noqa: E402
    BS,
    WAIT_S,
    Engine,
    Req,
    gate_disk,
    saved_on_disk,
    toks,
)

from kvbm.medium import Medium  # noqa: E402


def g2_idle(eng: Engine) -> bool:
    """No G2 page is held, reserved or in flight: every used page is a cached block."""
    t = eng.sched.mgr.stats(drain=False).tiers[Medium.CPU_PINNED]
    return t.pinned_blocks == 0 and t.used_blocks == t.cached_blocks


def test_an_async_load_aborted_midway_is_still_reported_received_once(tmp_path):
    """vLLM's finish_requests for a request in WAITING_FOR_REMOTE_KVS keeps its blocks
    (delay_free) until a worker reports it in finished_recving, whatever request_finished
    answers; a finished_sending as well would free them twice (vLLM asserts). So an aborted
    asynchronous load must still end in exactly one finished_recving, and its G2 holds must
    be given back."""
    tokens = toks(3 * BS + 6, 31)
    s, _, _ = saved_on_disk(tmp_path, tokens)
    with Engine(s) as eng:
        gate = gate_disk(eng)
        try:
            r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 32)])
            assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
            eng.step()
            # vLLM sets num_computed_tokens to the promised hit while the load runs.
            r2.num_computed_tokens = 3 * BS
            eng.sched.request_finished(r2, [8, 9, 10, 11])  # the client went away
        finally:
            gate.set()
        recving = sending = 0
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            step = eng.step()
            recving += sum("r2" in r.recving for r in step.ranks)
            sending += sum("r2" in r.sending for r in step.ranks)
            if recving and g2_idle(eng):
                break
            time.sleep(0.01)
        for _ in range(3):  # and never again
            step = eng.step()
            recving += sum("r2" in r.recving for r in step.ranks)
            sending += sum("r2" in r.sending for r in step.ranks)
        assert (recving, sending) == (1, 0)
        assert g2_idle(eng)
        eng.sched.mgr.check_invariants()
        assert eng.sched.reset()  # nothing of r2 is held any more


def _damage_pool_header(eng: Engine) -> None:
    with open(eng.sched.pool.path, "r+b") as f:  # the creator's mapping does not re-read it
        f.seek(40)
        f.write(b"\xff" * 8)


@pytest.mark.parametrize("damage", ["corrupt_header", "missing_file"])
def test_a_worker_that_cannot_attach_the_pool_fails_its_plans_and_still_reports(tmp_path,
                                                                                damage):
    """A pool a worker cannot map (a damaged header, the file gone) is garbage from the other
    side: the worker must not raise into vLLM's execute_model (that takes the engine down),
    and the step's promises still hold: the async request is reported received with its
    blocks as load errors, the saves are reported failed, so that no G2 page stays held."""
    tokens = toks(3 * BS + 6, 33)
    s, _, _ = saved_on_disk(tmp_path, tokens)
    with Engine(s) as eng:
        if damage == "corrupt_header":
            _damage_pool_header(eng)
        else:
            eng.sched.pool.unlink()
        r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 34)])
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            step = eng.step()  # raised StorageError out of start_load
            if step.plan.recv_done:
                break
            time.sleep(0.01)
        assert step.plan.recv_done == ["r2"]
        assert step.ranks[0].recving == {"r2"}
        assert step.ranks[0].errors == {8, 9, 10}
        assert eng.sched.counters.load_errors == 3
        # a save planned on such a pool fails, and its reserved pages are given back
        r3 = Req("r3", toks(2 * BS + 3, 35))
        assert eng.admit(r3, [0, 1, 2]) == (0, False)
        step = eng.prefill(r3, [0, 1, 2], 0)
        assert [p.direction.value for p in step.plan.plans] == ["save"]
        assert eng.sched.counters.failed_saves == 2
        assert g2_idle(eng)
        eng.sched.mgr.check_invariants()
