"""Leader election's expiry rule (client-go's): a lease expires when its record stayed unchanged for its
duration on the observer's own clock; the real apiserver is exercised in tests/e2e/test_lifecycle.py."""

from lora_operator.leader import LeaderElector, lease_body, micro_time


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def elector(clock):
    return LeaderElector(
        api=None, namespace="ns", name="lease", identity="me", duration=15, renew_interval=5, clock=clock
    )


def spec(holder="other", renew="2026-01-01T00:00:00.000000Z", transitions=0, duration=15):
    return {
        "holderIdentity": holder,
        "renewTime": renew,
        "leaseTransitions": transitions,
        "leaseDurationSeconds": duration,
    }


def test_a_renewed_lease_never_expires():
    clock = Clock()
    e = elector(clock)
    for i in range(10):
        assert not e._expired(spec(renew=f"2026-01-01T00:00:{i:02d}.000000Z"))
        clock.now += 10  # renewed every 10 s, lease 15 s


def test_an_unchanged_lease_expires_after_its_duration_regardless_of_clocks():
    clock = Clock()
    e = elector(clock)
    stale = spec(renew="1999-01-01T00:00:00.000000Z")  # a skewed clock on the holder does not matter
    assert not e._expired(stale)
    clock.now += 14
    assert not e._expired(stale)
    clock.now += 2
    assert e._expired(stale)
    assert not e._expired(spec(holder="third"))  # a new holder: the count starts again


def test_lease_body():
    body = lease_body("lease", "ns", "me", 6.4, 3, "a", "b")
    assert body["spec"] == {
        "holderIdentity": "me",
        "leaseDurationSeconds": 6,
        "acquireTime": "a",
        "renewTime": "b",
        "leaseTransitions": 3,
    }
    assert micro_time().endswith("Z") and len(micro_time()) == 27
