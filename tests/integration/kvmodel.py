"""A model of etcd's keyspace and history for the crash tests (test_crash.py,
test_powerloss.py): operations replayed in revision order give, at any revision, what a
member's Range must answer.

An operation is (kind, request) with kind "put" (a PutRequest), "txn" (a TxnRequest whose
success branch holds puts only, applied unconditionally) or "delete" (a DeleteRangeRequest
of one key). A state is {key: (value, create_revision, mod_revision, version)}, the form
Conn.range_all() returns.
"""


def apply_op(state, rev, op):
    """Applies op as revision rev to state (in place). Returns True if it made the
    revision (a delete of a missing key does not)."""
    kind, req = op
    if kind == "delete":
        if req.key not in state:
            return False
        del state[req.key]
        return True
    puts = [req] if kind == "put" else [o.request_put for o in req.success]
    for p in puts:
        old = state.get(p.key)
        state[p.key] = (p.value, old[1] if old else rev, rev, (old[3] if old else 0) + 1)
    return True


def replay(history, at_rev=None):
    """The state after history, a list of (revision, op) in revision order, as seen at
    revision at_rev (None: the last)."""
    state = {}
    for rev, op in history:
        if at_rev is not None and rev > at_rev:
            break
        apply_op(state, rev, op)
    return state
